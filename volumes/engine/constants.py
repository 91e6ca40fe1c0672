"""The tools the engine runs (their paths, the user they run as) and the limits every
operation obeys. Tests lower some of them: patch the module that reads the name."""

from __future__ import annotations

TOOLS_USER = "watasu-volumes"
DEBUGFS = "/usr/sbin/debugfs"
MKFS = "/usr/sbin/mkfs.ext4"
E2FSCK = "/usr/sbin/e2fsck"
BWRAP = "/usr/bin/bwrap"
SETPRIV = "/usr/bin/setpriv"
PRLIMIT = "/usr/bin/prlimit"

TOOL_TIMEOUT = 30.0  # wall clock seconds of one tool run...
DATA_SECONDS_PER_MIB = 0.5  # ...plus this per MiB of file data it copies
OPERATION_TIMEOUT = 120.0  # all runs of one operation (a deep listing, removing a tree)
TOOL_CPU_SECONDS = 60
TOOL_ADDRESS_SPACE = 1 << 30
MAX_OUTPUT_BYTES = 64 << 20  # what one run may print before it is killed
MAX_LIST_ENTRIES = 10_000
MAX_REMOVE_ENTRIES = 50_000
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MIN_IMAGE_BYTES = 16 << 20
MAX_LABEL_BYTES = 16
DEFAULT_FILE_MODE = 0o644
DEFAULT_DIR_MODE = 0o755
ROOT_INO = 2
STAGING_PREFIX = ".watasu-write-"
# Features whose on-disk structures debugfs maintains correctly when it writes. An image
# with any other (quota, project, inline_data, encrypt, casefold, bigalloc, ea_inode,
# verity...) is read but never written: its accounting would silently go wrong.
WRITABLE_FEATURES = frozenset(
    {
        *("has_journal", "ext_attr", "resize_inode", "dir_index", "filetype", "extent", "64bit"),
        *("flex_bg", "sparse_super", "sparse_super2", "large_file", "huge_file", "dir_nlink"),
        *("extra_isize", "metadata_csum", "metadata_csum_seed", "uninit_bg", "orphan_file"),
        "orphan_present",
    }
)
