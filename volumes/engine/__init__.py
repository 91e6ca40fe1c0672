"""Detached volume operations: the files inside a volume's ext4 image, never mounted.

A volume is a sparse raw file holding an ext4 filesystem. While no sandbox holds it, the
API still lists, reads and writes its files. Its bytes were last written by a guest kernel
that tenant code controls, so they are hostile input: a crafted superblock, directory or
extent tree must never reach the host kernel's ext4 driver. Nothing here mounts anything
(no mount, no loop device, no FUSE). Every operation runs e2fsprogs (``debugfs``,
``mkfs.ext4``, ``e2fsck``) as the unprivileged ``watasu-volumes`` user (scripts/setup-host)
inside a bubblewrap sandbox: new user, mount, pid, network, IPC, UTS and cgroup namespaces,
no capabilities, no_new_privs, read-only ``/usr`` and nothing else of the host (no /etc,
/var, /home, no other image), rlimits on CPU time, address space and file size, and a wall
clock timeout. The image enters the sandbox only as an inherited file descriptor, so the
tools user needs no access to the directory that holds it.

debugfs runs in batch mode (``-f``). Its stdout and stderr share one unbuffered pipe, and
each command is preceded by a comment line holding a random per-run nonce, which debugfs
echoes: the output splits into one section per command, and no name inside the image can
forge a section boundary. Paths are resolved one component at a time with lookups that do
not follow symlinks (``cd "./name"`` refuses a symlink), and once resolved, commands address
inodes by number (``<12>``). debugfs keeps going after a failed command, so a change that
depends on an earlier one succeeding is split into a second run, decided by the host.

Names are bytes in the image. Here they are ``str`` decoded with ``surrogateescape`` (lossless
for Python callers); the API shape (``Entry.as_dict``) shows bytes that are not UTF-8 as
``\\xNN``. A path component holding a newline or carriage return cannot be written into a
debugfs command file, so such paths are refused (listings still show those entries).
See docs/volumes.md for the limits, the error codes and the measured costs.

The package: ``constants`` (tool paths, limits), ``errors`` (one family, with the API's
status and code), ``entries`` (``Entry`` and the inode fields behind it), ``paths`` (paths,
modes and ids checked), ``sandbox`` (running a tool), ``debugfs`` (batch files and their
output split per command), ``parsing`` (what debugfs printed), ``walk`` (resolving a path),
``reads`` and ``writes`` (the operations). Import the package, not the modules: everything
public is re-exported here.
"""

from __future__ import annotations

from .constants import (
    BWRAP,
    DATA_SECONDS_PER_MIB,
    DEBUGFS,
    DEFAULT_DIR_MODE,
    DEFAULT_FILE_MODE,
    E2FSCK,
    MAX_LABEL_BYTES,
    MAX_LIST_ENTRIES,
    MAX_NAME_BYTES,
    MAX_OUTPUT_BYTES,
    MAX_PATH_BYTES,
    MAX_REMOVE_ENTRIES,
    MIN_IMAGE_BYTES,
    MKFS,
    OPERATION_TIMEOUT,
    PRLIMIT,
    ROOT_INO,
    SETPRIV,
    STAGING_PREFIX,
    TOOL_ADDRESS_SPACE,
    TOOL_CPU_SECONDS,
    TOOL_TIMEOUT,
    TOOLS_USER,
    WRITABLE_FEATURES,
)
from .entries import Entry
from .errors import (
    AlreadyExists,
    Corrupt,
    EngineError,
    InvalidArgument,
    InvalidMode,
    InvalidPath,
    IsADirectory,
    NoSpace,
    NotADirectory,
    NotARegularFile,
    NotFound,
    TooLarge,
    ToolFailed,
    TooManyEntries,
    Unsupported,
)
from .paths import parse_mode, split_path
from .reads import list_dir, read_file, stat, usage
from .sandbox import give_to_tools, run_tool, tools_ids
from .writes import create_image, make_dir, remove, set_metadata, write_file

__all__ = [
    "BWRAP",
    "DATA_SECONDS_PER_MIB",
    "DEBUGFS",
    "DEFAULT_DIR_MODE",
    "DEFAULT_FILE_MODE",
    "E2FSCK",
    "MAX_LABEL_BYTES",
    "MAX_LIST_ENTRIES",
    "MAX_NAME_BYTES",
    "MAX_OUTPUT_BYTES",
    "MAX_PATH_BYTES",
    "MAX_REMOVE_ENTRIES",
    "MIN_IMAGE_BYTES",
    "MKFS",
    "OPERATION_TIMEOUT",
    "PRLIMIT",
    "ROOT_INO",
    "SETPRIV",
    "STAGING_PREFIX",
    "TOOLS_USER",
    "TOOL_ADDRESS_SPACE",
    "TOOL_CPU_SECONDS",
    "TOOL_TIMEOUT",
    "WRITABLE_FEATURES",
    "AlreadyExists",
    "Corrupt",
    "EngineError",
    "Entry",
    "InvalidArgument",
    "InvalidMode",
    "InvalidPath",
    "IsADirectory",
    "NoSpace",
    "NotADirectory",
    "NotARegularFile",
    "NotFound",
    "TooLarge",
    "TooManyEntries",
    "ToolFailed",
    "Unsupported",
    "create_image",
    "give_to_tools",
    "list_dir",
    "make_dir",
    "parse_mode",
    "read_file",
    "remove",
    "run_tool",
    "set_metadata",
    "split_path",
    "stat",
    "tools_ids",
    "usage",
    "write_file",
]
