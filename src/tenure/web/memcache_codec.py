"""How values and keys look on the wire: python-memcached's flags and key rules, plus tenure's epoch tag.

Values are stored exactly as python-memcached 1.62 stores them, so entries
written by either client are read by the other:

=====================  =====  ==============================================
python-memcached flag  bit    value bytes
=====================  =====  ==============================================
(none)                 --     ``bytes`` as given
``_FLAG_PICKLE``       1      a pickle (any other type)
``_FLAG_INTEGER``      2      ``int`` as ASCII decimal (what incr/decr use)
``_FLAG_LONG``         4      read as ``int`` (written by Python 2 clients)
``_FLAG_COMPRESSED``   8      the above, zlib-compressed (``min_compress_len``)
``_FLAG_TEXT``         16     ``str`` as UTF-8
=====================  =====  ==============================================

tenure adds the ring epoch a value was written under in the upper 24 bits
of memcached's 32-bit flags (:func:`tag_of`); python-memcached tests those
flags bit by bit and ignores the upper ones. The one exception is a bare
``bytes`` value, which python-memcached reads only with flags 0: tenure
stores ``bytes`` pickled instead (a few bytes more), which python-memcached
and tenure both read back as the same ``bytes``.
"""

from __future__ import annotations

import logging
import pickle
import re
import zlib
from datetime import timedelta
from io import BytesIO
from typing import Any, Callable

from ..errors import MemcacheKeyCharacterError, MemcacheKeyLengthError, MemcacheKeyNoneError, MemcacheKeyTypeError

log = logging.getLogger("tenure.memcache")

FLAG_PICKLE = 1 << 0
FLAG_INTEGER = 1 << 1
FLAG_LONG = 1 << 2
FLAG_COMPRESSED = 1 << 3
FLAG_TEXT = 1 << 4
TAG_SHIFT = 8
LOW_FLAGS = (1 << TAG_SHIFT) - 1

SERVER_MAX_KEY_LENGTH = 250
SERVER_MAX_VALUE_LENGTH = 1024 * 1024
_VALID_KEY = re.compile(b"[\x21-\x7e\x80-\xff]+$")
_BYTES_PICKLE_PROTOCOL = 4  # compact for bytes; every unpickler python-memcached uses reads it


def tag_of(flags: int) -> int:
    """The ring epoch a stored value was written under (0: untagged, e.g. written by python-memcached)."""
    return flags >> TAG_SHIFT


class Codec:
    """python-memcached's value encoding and key checks, with its constructor's settings."""

    def __init__(self, *, pickle_protocol: int = 0, pickler: Callable[..., Any] = pickle.Pickler,
                 unpickler: Callable[..., Any] = pickle.Unpickler,
                 compressor: Callable[[bytes], bytes] = zlib.compress,
                 decompressor: Callable[[bytes], bytes] = zlib.decompress, pload: Any = None, pid: Any = None,
                 server_max_key_length: int | None = None, server_max_value_length: int | None = None,
                 check_keys: bool = True, key_encoder: Callable[[Any], Any] | None = None) -> None:
        self.pickle_protocol = pickle_protocol
        self.pickler = pickler
        self.unpickler = unpickler
        self.compressor = compressor
        self.decompressor = decompressor
        self.persistent_load = pload
        self.persistent_id = pid
        self.max_key = SERVER_MAX_KEY_LENGTH if server_max_key_length is None else server_max_key_length
        self.max_value = SERVER_MAX_VALUE_LENGTH if server_max_value_length is None else server_max_value_length
        self.check_keys = check_keys
        self.key_encoder: Callable[[Any], Any] = key_encoder or (lambda k: k)

    # -- keys -------------------------------------------------------------------------

    def key(self, key: Any, prefix: bytes = b"", *, multi: bool = False) -> tuple[int | None, bytes]:
        """``(hash value or None, key bytes with prefix)`` as python-memcached would send it; raises on a bad key.

        A ``(hash value, key)`` tuple names the hash itself, as in
        python-memcached. ``multi``: ints (and other str()-ables) are allowed,
        as get_multi and set_multi allow them.
        """
        key = self.key_encoder(key)
        hashvalue: int | None = None
        if isinstance(key, tuple):
            hashvalue, key = key
        if key is None:
            raise MemcacheKeyNoneError("Key is None")
        if isinstance(key, str):
            key = key.encode("utf8")
        elif not isinstance(key, bytes):
            if not multi:
                raise MemcacheKeyTypeError("Key must be a binary string")
            key = str(key).encode("utf8")
        if self.check_keys:
            self._check(key, len(prefix))
        return hashvalue, prefix + key

    def prefix(self, key_prefix: Any) -> bytes:
        p = key_prefix.encode("utf8") if isinstance(key_prefix, str) else bytes(key_prefix or b"")
        if p and self.check_keys:
            self._check(p, 0)
        return p

    def _check(self, key: bytes, extra: int) -> None:
        if key == b"":
            if extra == 0:
                raise MemcacheKeyNoneError("Key is empty")
            return
        if self.max_key and len(key) + extra > self.max_key:
            raise MemcacheKeyLengthError(f"Key length is > {self.max_key}")
        if not _VALID_KEY.match(key):
            raise MemcacheKeyCharacterError(f"Control/space characters not allowed (key={key!r})")

    # -- values -------------------------------------------------------------------------

    def encode(self, val: Any, min_compress_len: int = 0) -> tuple[int, bytes] | None:
        """``(flags, bytes)`` for ``val``, or None if too large to store (python-memcached skips it silently)."""
        flags = 0
        t = type(val)  # the exact type: subclasses are pickled and come back as themselves
        if t is str:
            flags, data = FLAG_TEXT, val.encode("utf-8")
        elif t is int:
            flags, data = FLAG_INTEGER, b"%d" % val
            min_compress_len = 0
        elif t is bytes:
            flags, data = FLAG_PICKLE, pickle.dumps(val, protocol=max(self.pickle_protocol, _BYTES_PICKLE_PROTOCOL))
        else:
            flags = FLAG_PICKLE
            f = BytesIO()
            try:
                p = self.pickler(f, protocol=self.pickle_protocol)
            except TypeError:
                p = self.pickler(f, self.pickle_protocol)
            if self.persistent_id:
                p.persistent_id = self.persistent_id
            p.dump(val)
            data = f.getvalue()
        if min_compress_len and len(data) > min_compress_len:
            packed = self.compressor(data)
            if len(packed) < len(data):
                flags |= FLAG_COMPRESSED
                data = packed
        if self.max_value and len(data) > self.max_value:
            return None
        return flags, data

    def decode(self, flags: int, data: bytes) -> tuple[bool, Any]:
        """``(True, value)``, or ``(False, None)`` for a value that cannot be read (logged; a miss)."""
        flags &= LOW_FLAGS
        try:
            if flags & FLAG_COMPRESSED:
                data = self.decompressor(data)
                flags &= ~FLAG_COMPRESSED
            if flags == 0:
                return True, data
            if flags & FLAG_TEXT:
                return True, data.decode("utf-8")
            if flags & (FLAG_INTEGER | FLAG_LONG):
                return True, int(data)
            if flags & FLAG_PICKLE:
                u = self.unpickler(BytesIO(data))
                if self.persistent_load:
                    u.persistent_load = self.persistent_load
                return True, u.load()
        except Exception as e:  # a value another program wrote: a miss, as python-memcached treats bad pickles
            log.warning("unreadable cached value (flags %#x): %s", flags, e)
            return False, None
        log.warning("unknown flags on a cached value: %#x", flags)
        return False, None


def expiry(time: Any) -> int:
    """memcached's exptime from python-memcached's ``time`` (seconds, or a timedelta)."""
    if isinstance(time, timedelta):
        return int(time.total_seconds())
    return int(time or 0)
