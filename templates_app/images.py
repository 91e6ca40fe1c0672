"""The public images a template may name, and what our Debian 12 base gives for them.

We do not import OCI images: `from_image("python:3.11")` builds on the `base` template
(Debian 12) and installs what makes it behave like that image. That is only honest for
the versions Debian 12 ships (Python 3.11, Node.js 18), so a tag naming any other version
is refused when the build is requested, with the tags we can honour, instead of building
something else and letting the first step find out.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

from watasu import errors

# Debian's Python is "externally managed" (PEP 668): without this, `pip install` outside a
# venv fails. The official python images let root install into the system Python.
PIP_CONF = "[global]\nbreak-system-packages = true\n"


@dataclass(frozen=True)
class ImageFamily:
    """One public image name and what building it on Debian 12 takes."""

    name: str
    provides: str  # what the user gets, for messages: "Python 3.11"
    tags: tuple[str, ...]  # the tags that mean what Debian 12 provides
    packages: tuple[str, ...] = ()  # apt packages installed in the image step
    files: tuple[tuple[str, str], ...] = ()  # (path, content) written by the image step

    def refs(self) -> list[str]:
        return [f"{self.name}:{tag}" for tag in self.tags]


def _tags(versions: tuple[str, ...], suffixes: tuple[str, ...]) -> tuple[str, ...]:
    tags = (f"{version}{suffix}".lstrip("-") for version, suffix in product(versions, suffixes))
    return tuple(dict.fromkeys(tag for tag in tags if tag))


FAMILIES = {
    family.name: family
    for family in (
        ImageFamily(
            "python",
            "Python 3.11 (Debian 12's), with pip and a `python` command",
            _tags(("3", "3.11", "latest", ""), ("", "-slim", "-bookworm", "-slim-bookworm")),
            ("python3", "python3-pip", "python3-venv", "python-is-python3"),
            (("/etc/pip.conf", PIP_CONF),),
        ),
        ImageFamily(
            "node",
            "Node.js 18 (Debian 12's), with npm",
            _tags(
                ("18", "lts", "latest", "hydrogen", "lts-hydrogen", ""),
                ("", "-slim", "-bookworm", "-bookworm-slim"),
            ),
            ("nodejs", "npm"),
        ),
        ImageFamily("debian", "Debian 12", _tags(("bookworm", "12", "latest", "stable", ""), ("", "-slim"))),
        ImageFamily("base", "the base template", ("latest",)),
    )
}
# Registry prefixes that still name the official image (`docker.io/library/python`).
OFFICIAL_PREFIXES = ("docker.io/library/", "index.docker.io/library/", "docker.io/", "library/")


def _split(image: str) -> tuple[str, str]:
    """`docker.io/library/python:3.11` -> (`python`, `3.11`); no tag means `latest`."""
    for prefix in OFFICIAL_PREFIXES:
        if image.startswith(prefix):
            image = image[len(prefix) :]
            break
    name, _, tag = image.partition(":")
    return name, tag or "latest"


def image_import_disabled(image: str) -> errors.Invalid:
    supported = ", ".join(f"{name}:*" for name in FAMILIES)
    return errors.Invalid(
        f"Image '{image}' cannot be imported; supported images: {supported}, or from_template.",
        code="oci_image_import_disabled",
    )


def image_family(image: str) -> ImageFamily:
    """The family an image reference is honoured by, or a 422 saying why it is not:
    `oci_image_import_disabled` for images we do not build, `image_version_unavailable`
    (listing the accepted tags) for versions Debian 12 does not provide."""
    name, tag = _split(image.strip())
    family = FAMILIES.get(name)
    if family is None or "@" in tag:
        raise image_import_disabled(image)
    if tag not in family.tags:
        raise errors.Invalid(
            f"Image '{image}' is not available: templates build on Debian 12, which provides "
            f"{family.provides}; use one of: {', '.join(family.refs())}.",
            code="image_version_unavailable",
            requested=image,
            available=family.refs(),
        )
    return family
