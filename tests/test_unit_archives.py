"""Unit tier (no root, no network, no stap): reading either side's zip
archive safely.  Every entry is checked before anything is written (names,
types, sizes, compression ratio, count, total), unpacking writes only inside
its directory, and an unsigned reply is read into a Reply."""

import hashlib
import io
import os
import stat
import struct
import zipfile
import zlib

import pytest

from stap_client import Error, Limits, extract_archive, open_archive, read_reply, safe_members

pytestmark = pytest.mark.unit


def zipped(entries, kind=None, method=zipfile.ZIP_DEFLATED):
    """A zip of (name, bytes); kind: a Unix file type recorded for each entry."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in entries:
            info = zipfile.ZipInfo(name, (2024, 1, 1, 0, 0, 0))
            info.compress_type = method
            if kind is not None:
                info.create_system = 3
                info.external_attr = (kind | 0o644) << 16
            zf.writestr(info, data)
    return buf.getvalue()


def repeated_zip(count, data):
    """A zip of count entries z0, z1, ... each holding data, deflated once (zipfile would deflate
    each copy again: a quarter of a second a MiB on a loaded machine)."""
    deflate = zlib.compressobj(wbits=-15)
    packed = deflate.compress(data) + deflate.flush()
    sizes = struct.pack("<III", zlib.crc32(data), len(packed), len(data))
    local, central = io.BytesIO(), io.BytesIO()
    for n in range(count):
        name, offset = f"z{n}".encode(), local.tell()
        # version 2.0, no flags, deflate, 1 Jan 2024 00:00, then the sizes and the name's length
        common = struct.pack("<HHHHH", 20, 0, zipfile.ZIP_DEFLATED, 0, 0x5821) + sizes
        local.write(b"PK\3\4" + common + struct.pack("<HH", len(name), 0) + name + packed)
        central.write(b"PK\1\2" + struct.pack("<H", 20) + common
                      + struct.pack("<HHHHHII", len(name), 0, 0, 0, 0, 0, offset) + name)
    end = struct.pack("<4sHHHHIIH", b"PK\5\6", 0, 0, count, count, central.tell(), local.tell(), 0)
    return local.getvalue() + central.getvalue() + end


def check(data, limits=None):
    return [i.filename for i in safe_members(open_archive(data), limits or Limits())]


def refusal(data, limits=None):
    with pytest.raises(Error) as e:
        check(data, limits)
    return str(e.value)


def test_plain_entries_pass():
    data = zipped([("version", b"4.8"), ("script/", b""), ("script/tmp/x.stp", b"probe")])
    assert check(data) == ["version", "script/", "script/tmp/x.stp"]
    assert check(zipped([("rc", b"0")], kind=stat.S_IFREG)) == ["rc"]


@pytest.mark.parametrize("name", ["../x", "/abs", "a/../b", "a//b", "a\\b", "./a", "a/."])
def test_names_that_leave_the_directory_are_refused(name):
    assert refusal(zipped([(name, b"x")])) == \
        f"archive entry name {name!r} is not a plain relative path"


@pytest.mark.parametrize("kind", [stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO,
                                  stat.S_IFSOCK])
def test_special_files_are_refused(kind):
    assert refusal(zipped([("entry", b"/etc/passwd")], kind=kind)) == \
        "archive entry entry is not a regular file or directory"


def test_sizes_counts_and_ratio_are_bounded():
    assert refusal(zipped([("a", b"x"), ("b", b"y"), ("c", b"z")]), Limits(max_entries=2)) == \
        "archive has 3 entries (limit 2)"
    assert refusal(zipped([("a", b"12345")]), Limits(max_entry_bytes=4)) == \
        "archive entry a is too large (5 bytes)"
    assert refusal(zipped([("a", b"123"), ("b", b"456")]), Limits(max_total_bytes=5)) == \
        "archive unpacks to 6 bytes, more than 5"
    # over 1 MiB, at most 200 times smaller compressed: a zip bomb is not
    assert refusal(zipped([("bomb", b"\0" * (2 << 20))])) == \
        "archive entry bomb is compressed suspiciously well"
    # many entries each at the one-entry bound: the whole archive is bounded alike
    assert refusal(repeated_zip(255, b"\0" * (1 << 20))) == \
        "archive unpacks to 267386880 bytes, more than 200 times its compressed size"
    assert check(zipped([("stored", b"\0" * (2 << 20))], method=zipfile.ZIP_STORED)) == \
        ["stored"]


def test_the_total_limit_is_worded_by_the_caller():
    limits = Limits(max_total_bytes=5, too_large="request of {total} bytes, limit {limit}")
    assert refusal(zipped([("a", b"123"), ("b", b"456")]), limits) == \
        "request of 6 bytes, limit 5"


def test_not_a_zip():
    with pytest.raises(Error) as e:
        open_archive(b"PK\x03\x04 but not really")
    assert str(e.value) == "not a valid zip archive (File is not a zip file)"


def test_extract_writes_files_0644_and_directories_0755_inside_dest(tmp_path):
    data = zipped([("d/", b""), ("d/e/f", b"deep"), ("top", b"t")])
    sha1 = extract_archive(open_archive(data), str(tmp_path), Limits())
    assert list(sha1) == ["d/", "d/e/f", "top"]  # every entry, hashed as it was written
    assert sha1["d/e/f"].digest() == hashlib.sha1(b"deep").digest()
    assert (tmp_path / "d" / "e" / "f").read_bytes() == b"deep"
    assert stat.S_IMODE(os.stat(tmp_path / "top").st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755
    assert sorted(os.listdir(tmp_path)) == ["d", "top"]


def test_extract_only_the_named_entries(tmp_path):
    data = zipped([("rc", b"0"), ("stray", b"x")])
    extract_archive(open_archive(data), str(tmp_path), Limits(), only={"rc"})
    assert os.listdir(tmp_path) == ["rc"]


def test_extract_refuses_duplicates_and_existing_links(tmp_path):
    with pytest.warns(UserWarning):  # zipfile warns of the duplicate name
        data = zipped([("a", b"1"), ("a", b"2")])
    with pytest.raises(Error) as e:
        extract_archive(open_archive(data), str(tmp_path), Limits())
    assert str(e.value) == "cannot unpack archive entry a: File exists"
    assert (tmp_path / "a").read_bytes() == b"1"
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(tmp_path / "outside", dest / "x")
    with pytest.raises(Error) as e:
        extract_archive(open_archive(zipped([("x", b"in")])), str(dest), Limits())
    assert str(e.value) == "cannot unpack archive entry x: File exists"
    assert not (tmp_path / "outside").exists()


# --------------------------------------------------------------------------
# An unsigned reply (signed ones: test_unit_der.py)
# --------------------------------------------------------------------------

REPLY = [("version", b"4.8\n"), ("rc", b"0"), ("stdout", b"out\n"), ("stderr", b"")]


def test_unsigned_reply_is_read(tmp_path):
    module = "stap000000/stap_1234.ko"
    reply = read_reply(zipped(REPLY + [(module, b"\x7fELF")]), str(tmp_path), b"")
    assert (reply.rc, reply.stdout, reply.stderr, reply.version) == (0, b"out\n", b"", "4.8")
    assert reply.module == os.path.join(str(tmp_path), "reply", module)
    with open(reply.module, "rb") as f:
        assert f.read() == b"\x7fELF"
    assert not reply.busy


def test_a_busy_reply_says_so(tmp_path):
    reply = read_reply(zipped([("rc", b"1"), ("stderr", b"stap-serverd: server busy\n")]),
                       str(tmp_path), b"")
    assert reply.busy and reply.rc == 1 and reply.module is None and reply.version == ""


@pytest.mark.parametrize("entries,message", [
    ([("version", b"4.8")], "reply has no rc entry"),
    ([("rc", b"zero")], "reply's rc entry is not a number"),
    ([("rc", b"0"), ("stap000000/a.ko", b""), ("stap111111/b.ko", b"")],
     "reply holds more than one module directory"),
])
def test_bad_replies(tmp_path, entries, message):
    with pytest.raises(Error) as e:
        read_reply(zipped(entries), str(tmp_path), b"")
    assert str(e.value) == message
