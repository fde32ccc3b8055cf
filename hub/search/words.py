"""Words of person names, for multi-word name search ("nguyen thi hoa" finds Nguyễn Thị Hoa).

Owns: which string parameters are searched word by word (the HumanName ones: ``name``,
``family``, ``given`` and ``phonetic`` of Patient, Practitioner, RelatedPerson and Person),
how folded text splits into words (on whitespace and punctuation), and the *word rows*
those parameters add to ``idx_string``: ``(H(type, code + ":word"), H(type, code + ":word",
word), word, word)``. They carry their own ``hash_identity``, so ``_sort``, ``:missing``,
``:contains``, ``:exact`` and one-word search, which all look at the parameter's own
identity (or ``hash_exact``), never see them.
A part's first word is not repeated as a word row: the part's own row (``value_norm`` =
the folded part) already starts with it, and the search looks for each word under both
identities. So ``family: "Nguyễn"``, ``given: ["Thị", "Hoa"]`` adds no row at all, and
``given: ["Thị Hoa"]`` adds one ("hoa") per parameter.
Calls: hashing.  Called by: ``hub.search.index`` (the rows), ``hub.search.predicates``
(the search).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

from hub.search.hashing import hash64

NAME_TYPES = frozenset({"Patient", "Practitioner", "RelatedPerson", "Person"})
NAME_CODES = frozenset({"name", "family", "given", "phonetic"})

# Anything but a letter or digit separates words: spaces, hyphens, commas, periods,
# apostrophes ("O'Brien"), brackets, and the underscore (so a query word never holds a LIKE
# wildcard).
_SEPARATORS = re.compile(r"[\W_]+")


def searched_by_word(resource_type: str, code: str) -> bool:
    return resource_type in NAME_TYPES and code in NAME_CODES


def words(folded: str) -> list[str]:
    """The distinct words of already folded text, in order of first appearance."""
    return list(dict.fromkeys(w for w in _SEPARATORS.split(folded) if w))


@lru_cache(maxsize=64)
def word_identity(resource_type: str, code: str) -> int:
    """``hash_identity`` of a parameter's word rows. No parameter code holds a colon, so it
    is never a parameter's own identity."""
    return hash64(resource_type, f"{code}:word")


def word_rows(resource_type: str, code: str, folded: str) -> Iterator[tuple[int, int, str, str]]:
    """``idx_string`` tuples (without pid) for the words of one folded part that the part's
    own row does not start with."""
    identity = word_identity(resource_type, code)
    for word in words(folded):
        if not folded.startswith(word):
            yield identity, hash64(resource_type, f"{code}:word", word), word, word
