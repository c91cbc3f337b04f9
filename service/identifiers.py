"""What an individual id may be.

Ids travel in URLs and are shown to people, so they are restricted to a portable alphabet. Photo files are named
by content hash, never by id, so an id can never become a path; the check here is what keeps ``..``, ``a/b`` and
friends out of the database and the URLs in the first place.
"""

from __future__ import annotations

import re

from reid.metrics import NEW_TURTLE

INDIVIDUAL_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
_INDIVIDUAL_ID = re.compile(INDIVIDUAL_ID_PATTERN)
#: ``.`` and ``..`` match the alphabet but mean "this/parent folder" to every tool that sees them;
#: ``new_turtle`` is the answer identify gives for an unknown animal, so no individual may be called that.
RESERVED_IDS = frozenset({".", "..", NEW_TURTLE})


def check_individual_id(value: str) -> str:
    """Return ``value`` unchanged if it is a valid individual id, else raise ``ValueError`` naming it."""
    if not _INDIVIDUAL_ID.fullmatch(value):
        shown = value if len(value) <= 40 else f"{value[:40]}... ({len(value)} characters)"
        raise ValueError(f"individual id {shown!r} is invalid: use 1 to 128 of A-Z a-z 0-9 _ . -")
    if value in RESERVED_IDS:
        raise ValueError(f"individual id {value!r} is reserved")
    return value
