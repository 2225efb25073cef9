"""Unit tier (no root, no network, no stap): the DER the client and server
read themselves.  Certificates (their serial, expiry, fingerprint, files in
PEM or DER) and the PKCS#7 signature block of a signed reply, checked
against the peer's certificate; the DER here is built by the test itself,
signed with a fixed 1024-bit RSA test key."""

import calendar
import collections
import hashlib
import io
import ssl
import zipfile

import pytest

import stap_client
import stap_server
from stap_client import (
    Error,
    ReplyContent,
    certificate_serial,
    check_pkcs7_signature,
    der_children,
    der_element,
    fingerprint,
    read_certificate_file,
    read_reply,
    reply_entries,
    rsa_signature_valid,
    serial_text,
    signed_jar,
    tbs_fields,
)

pytestmark = pytest.mark.unit

# --------------------------------------------------------------------------
# DER, a test key and certificates made from it
# --------------------------------------------------------------------------


def tlv(tag, *content):
    body = b"".join(content)
    if len(body) < 0x80:
        return bytes([tag, len(body)]) + body
    size = len(body).to_bytes((len(body).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + body


def integer(value):
    return tlv(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def oid(hex_body):
    return tlv(0x06, bytes.fromhex(hex_body))


SHA1, SHA256, MD5 = oid("2b0e03021a"), oid("608648016503040201"), oid("2a864886f70d0205")
RSA = oid("2a864886f70d010101")
SHA256_RSA = oid("2a864886f70d01010b")
DATA, SIGNED_DATA = oid("2a864886f70d010701"), oid("2a864886f70d010702")
CONTENT_TYPE, MESSAGE_DIGEST = oid("2a864886f70d010903"), oid("2a864886f70d010904")
DIGEST_INFO = {SHA1: bytes.fromhex("3021300906052b0e03021a05000414"),
               SHA256: bytes.fromhex("3031300d060960864801650304020105000420")}
HASH = {SHA1: hashlib.sha1, SHA256: hashlib.sha256, MD5: hashlib.md5}

N = int(
    "9c40ca3743f2d6031447ac0bc042aadac14c56e55d95a3a7db7851715cc339fa"
    "bdc40c76a2d40d6772363e483c3f1f6d84ba3a9df38b3908c376252327ae2324"
    "0abe2a87b07229e1d41ee3eb0ecc087215cce0b187751f12282e8796c9354a6a"
    "0bdb23d1759c9482783c7be6acacbbc57ac3d12b8fcd18a33f6359ad70acc5c7", 16)
D = int(
    "7e9c413ee6e02e69f054e323e27622db7f25cc83ae81424b119b3ce30eb76293"
    "ba90d148904823545f4774d0338132861bb68b28d1df4e27bbba4ffd5c79ce1e"
    "7200bdf78f1bb88c65cd29a38cd46a75a06a6289bc9ca015250da0300c0cd51a"
    "4ade0800e9cb5a98b496cb38efdd25ecccf79af534ea2db2e142da2906691901", 16)
E = 65537
K = 128  # bytes of the modulus


def rsa_sign(digest_info):
    """RSA PKCS#1 v1.5 with the test key: 00 01 FF.. 00 DigestInfo, to the power D."""
    block = b"\x00\x01" + b"\xff" * (K - 3 - len(digest_info)) + b"\x00" + digest_info
    return pow(int.from_bytes(block, "big"), D, N).to_bytes(K, "big")


def name(cn):
    return tlv(0x30, tlv(0x31, tlv(0x30, oid("550403"), tlv(0x0C, cn.encode()))))


def certificate(serial, not_after=b"301231235959Z", version=True, n=N):
    """A self-signed X.509 certificate of the test key (or another modulus)."""
    spki = tlv(0x30, tlv(0x30, RSA, b"\x05\x00"),
               tlv(0x03, b"\x00" + tlv(0x30, integer(n), integer(E))))
    time_tag = 0x17 if len(not_after) == 13 else 0x18  # UTCTime or GeneralizedTime
    tbs = tlv(0x30, tlv(0xA0, integer(2)) if version else b"", integer(serial),
              tlv(0x30, SHA256_RSA, b"\x05\x00"), name("Systemtap Compile Server"),
              tlv(0x30, tlv(0x17, b"250101000000Z"), tlv(time_tag, not_after)),
              name("Systemtap Compile Server"), spki)
    signature = rsa_sign(DIGEST_INFO[SHA256] + hashlib.sha256(tbs).digest())
    return tlv(0x30, tbs, tlv(0x30, SHA256_RSA, b"\x05\x00"), tlv(0x03, b"\x00" + signature))


CERT = certificate(0x7060531A)
OTHER_CERT = certificate(0x7060531B)


def pkcs7(content, certs=(CERT,), digest=SHA1, digest_of=None, signature=None,
          signers=1):
    """A detached PKCS#7 SignedData of content with authenticated attributes,
    as signtool makes it; the keywords spoil one part of it."""
    hasher = HASH[digest]
    attributes = tlv(0x31, tlv(0x30, CONTENT_TYPE, tlv(0x31, DATA)),
                     tlv(0x30, MESSAGE_DIGEST,
                         tlv(0x31, tlv(0x04, hasher(digest_of or content).digest()))))
    if signature is None:
        signature = rsa_sign(DIGEST_INFO.get(digest, b"") + hasher(attributes).digest())
    fields = tbs_fields(CERT)
    issuer_serial = tlv(0x30, CERT[fields[2][1]:fields[2][3]], CERT[fields[0][1]:fields[0][3]])
    signer_info = tlv(0x30, integer(1), issuer_serial, tlv(0x30, digest, b"\x05\x00"),
                      b"\xa0" + attributes[1:], tlv(0x30, RSA, b"\x05\x00"),
                      tlv(0x04, signature))
    signed_data = tlv(0x30, integer(1), tlv(0x31, tlv(0x30, digest, b"\x05\x00")),
                      tlv(0x30, DATA), tlv(0xA0, *certs), tlv(0x31, *[signer_info] * signers))
    return tlv(0x30, SIGNED_DATA, tlv(0xA0, signed_data))


# --------------------------------------------------------------------------
# DER elements
# --------------------------------------------------------------------------

def test_der_element_short_and_long_lengths():
    assert der_element(b"\x04\x03abc", 0) == (0x04, 2, 5)
    long = tlv(0x04, b"x" * 200)
    assert long[:3] == b"\x04\x81\xc8" and der_element(long, 0) == (0x04, 3, 203)
    longer = tlv(0x30, b"y" * 300)
    assert der_element(longer, 0) == (0x30, 4, 304)
    seq = tlv(0x30, integer(5), tlv(0x04, b"ab"))
    assert list(der_children(seq, 2, len(seq))) == [(0x02, 2, 4, 5), (0x04, 5, 7, 9)]


@pytest.mark.parametrize("data,message", [
    (b"\x04\x80", "bad DER length"),                    # indefinite: not DER
    (b"\x04\x85\x00\x00\x00\x00\x01x", "bad DER length"),
    (b"\x04\x05abc", "DER element overruns its container"),
    (b"\x04\x82\x01\x00" + b"x" * 255, "DER element overruns its container"),
])
def test_der_element_refuses(data, message):
    with pytest.raises(ValueError) as e:
        der_element(data, 0)
    assert str(e.value) == message


# --------------------------------------------------------------------------
# Certificates
# --------------------------------------------------------------------------

def test_serial_with_and_without_the_version_field():
    assert certificate_serial(CERT) == 0x7060531A
    assert certificate_serial(certificate(0xC102, version=False)) == 0xC102
    assert serial_text(certificate_serial(certificate(0xC102))) == "00:c1:02"
    # serial, signature, issuer, validity, subject, key: the fields after the version
    fields = tbs_fields(CERT)
    assert [tag for tag, *_ in fields] == [0x02, 0x30, 0x30, 0x30, 0x30, 0x30]
    assert CERT[fields[2][1]:fields[2][3]] == name("Systemtap Compile Server")


def test_serial_text_is_what_servers_advertise():
    assert serial_text(5) == "05"
    assert serial_text(0x0A0B) == "0a:0b"
    assert serial_text(0x7060531A) == "70:60:53:1a"
    assert serial_text(0xCC3E05FC) == "00:cc:3e:05:fc"  # the DER integer's leading 00 kept
    assert stap_server.certinfo(certificate(0xCC3E05FC)) == "00:cc:3e:05:fc"


def test_expiry_in_utc_and_generalized_time():
    assert stap_server.not_after(CERT) == calendar.timegm((2030, 12, 31, 23, 59, 59))
    assert stap_server.not_after(certificate(1, not_after=b"20510101000000Z")) == \
        calendar.timegm((2051, 1, 1, 0, 0, 0))
    assert stap_server.expires_within(certificate(1, not_after=b"000101000000Z"), 0)
    assert not stap_server.expires_within(CERT, 86400)
    with pytest.raises(Error) as e:
        stap_server.not_after(certificate(1, not_after=b"30-12-31 23:5"))
    assert str(e.value) == "cannot read the certificate's validity"


def test_fingerprints():
    digest = hashlib.sha256(CERT).hexdigest()
    assert fingerprint(CERT) == ":".join(digest.upper()[i:i + 2] for i in range(0, 64, 2))
    assert len(fingerprint(CERT)) == 95


def test_certificate_files_in_der_or_pem(tmp_path):
    der, pem, two, junk = (tmp_path / n for n in ("c.der", "c.pem", "two.pem", "junk"))
    der.write_bytes(CERT)
    pem.write_text("subject: whatever\n" + ssl.DER_cert_to_PEM_cert(CERT))
    two.write_text(ssl.DER_cert_to_PEM_cert(CERT) + ssl.DER_cert_to_PEM_cert(OTHER_CERT))
    junk.write_bytes(b"hello")
    assert read_certificate_file(str(der)) == CERT
    assert read_certificate_file(str(pem)) == CERT
    for path, message in ((two, f"{two} holds 2 certificates, expected one"),
                          (junk, f"{junk} is not a certificate (neither PEM nor DER)"),
                          (tmp_path / "missing", f"cannot read certificate {tmp_path}/missing: "
                                                 "No such file or directory")):
        with pytest.raises(Error) as e:
            read_certificate_file(str(path))
        assert str(e.value) == message


# --------------------------------------------------------------------------
# The PKCS#7 signature block of a signed reply
# --------------------------------------------------------------------------

CONTENT = b"Signature-Version: 1.0\nSHA1-Digest: x\n"


def test_a_good_signature_of_the_peer_passes():
    check_pkcs7_signature(pkcs7(CONTENT), CONTENT, CERT)  # SHA-1, as signtool signs
    check_pkcs7_signature(pkcs7(CONTENT, digest=SHA256), CONTENT, CERT)


@pytest.mark.parametrize("block,content,peer,message", [
    (pkcs7(CONTENT), CONTENT + b"x", CERT,
     "reply signature does not verify (signature file altered)"),
    (pkcs7(CONTENT, digest_of=b"other"), CONTENT, CERT,
     "reply signature does not verify (signature file altered)"),
    (pkcs7(CONTENT), CONTENT, OTHER_CERT,
     "reply is signed by a certificate other than the server's"),
    (pkcs7(CONTENT, certs=(CERT, OTHER_CERT)), CONTENT, CERT,
     "reply signature carries 2 certificates, expected one"),
    (pkcs7(CONTENT, certs=()), CONTENT, CERT,
     "reply signature carries 0 certificates, expected one"),
    (pkcs7(CONTENT, signers=2), CONTENT, CERT, "reply signature has more than one signer"),
    (pkcs7(CONTENT, digest=MD5), CONTENT, CERT, "reply signature uses an unknown digest or form"),
    (pkcs7(CONTENT, signature=b"\x01" * K), CONTENT, CERT,
     "reply signature does not verify (bad signature)"),
])
def test_bad_signatures(block, content, peer, message):
    with pytest.raises(Error) as e:
        check_pkcs7_signature(block, content, peer)
    assert str(e.value) == message


def test_a_signature_by_another_key_in_the_peers_name_fails():
    impostor = certificate(0x7060531A, n=N + 2)  # same name and serial, another modulus
    block = pkcs7(CONTENT, certs=(impostor,))
    with pytest.raises(Error) as e:
        check_pkcs7_signature(block, CONTENT, impostor)
    assert str(e.value) == "reply signature does not verify (bad signature)"


def test_rsa_signature_check():
    digest_info = DIGEST_INFO[SHA256] + hashlib.sha256(b"module").digest()
    good = rsa_sign(digest_info)
    assert rsa_signature_valid(CERT, digest_info, good)
    assert not rsa_signature_valid(CERT, digest_info[:-1] + b"\0", good)
    assert not rsa_signature_valid(CERT, digest_info, good[1:])  # not the modulus' length
    assert not rsa_signature_valid(CERT, digest_info, N.to_bytes(K, "big"))  # not below n


def test_a_truncated_block_is_malformed():
    block = pkcs7(CONTENT)
    for cut in (1, 10, len(block) // 2, len(block) - 1):
        with pytest.raises((ValueError, IndexError)):
            check_pkcs7_signature(block[:cut], CONTENT, CERT)


# --------------------------------------------------------------------------
# A signed reply, read whole
# --------------------------------------------------------------------------

ENTRIES = [("version", b"4.8"), ("rc", b"0"), ("stdout", b"stap_1.ko\n"), ("stderr", b""),
           ("stap000000/stap_1.ko", b"\x7fELF module")]


def signed_reply(entries=ENTRIES, extra=(), tamper=None):
    manifest, signature_file = stap_client.jar_manifests(list(entries))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for entry, data in list(entries) + list(extra) + [
                ("META-INF/manifest.mf", manifest), ("META-INF/zigbert.sf", signature_file),
                ("META-INF/zigbert.rsa", pkcs7(signature_file))]:
            zf.writestr(entry, tamper.get(entry, data) if tamper else data)
    return buf.getvalue()


def test_a_signed_reply_is_verified_and_read(tmp_path):
    reply = read_reply(signed_reply(), str(tmp_path), CERT)
    assert (reply.rc, reply.stdout, reply.version) == (0, b"stap_1.ko\n", "4.8")
    with open(reply.module, "rb") as f:
        assert f.read() == b"\x7fELF module"


@pytest.mark.parametrize("kind,message", [
    ("tampered", "reply signature does not verify (stap000000/stap_1.ko altered)"),
    ("extra", "reply entry stap000000/evil.ko is not covered by the server's signature"),
    ("other peer", "reply is signed by a certificate other than the server's"),
    ("no block", "reply signature has no single signature block"),
])
def test_signed_reply_refusals(tmp_path, kind, message):
    peer = OTHER_CERT if kind == "other peer" else CERT
    if kind == "no block":
        data = signed_reply(tamper=None)
        src = zipfile.ZipFile(io.BytesIO(data))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for info in src.infolist():
                if info.filename != "META-INF/zigbert.rsa":
                    zf.writestr(info.filename, src.read(info))
        data = buf.getvalue()
    else:
        data = signed_reply(
            extra=[("stap000000/evil.ko", b"x")] if kind == "extra" else (),
            tamper={"stap000000/stap_1.ko": b"\x7fELF other"} if kind == "tampered" else None)
    with pytest.raises(Error) as e:
        read_reply(data, str(tmp_path), peer)
    assert str(e.value) == message


def test_each_entry_is_inflated_once_hashed_as_it_is_unpacked(tmp_path, monkeypatch):
    opened = collections.Counter()
    zip_open = zipfile.ZipFile.open

    def counting_open(self, name, *args, **kw):
        opened[getattr(name, "filename", name)] += 1
        return zip_open(self, name, *args, **kw)

    data = signed_reply()
    monkeypatch.setattr(zipfile.ZipFile, "open", counting_open)
    read_reply(data, str(tmp_path), CERT)
    assert opened["stap000000/stap_1.ko"] == 1


def test_what_the_reply_writer_writes_read_reply_reads(tmp_path):
    """The shared writer and reader side by side: the writer gets only a signing callable (here the
    test key's), the reader checks the signature against the certificate."""
    def sign(data, algorithm):
        assert algorithm == "SEC_OID_PKCS1_SHA1_WITH_RSA_ENCRYPTION"
        return rsa_sign(DIGEST_INFO[SHA1] + hashlib.sha1(data).digest())

    content = ReplyContent(0, b"stap_1.ko\n", b"a warning\n", "4.8",
                           ("stap_1.ko", b"\x7fELF module", b"module signature"), b"MOK DER")
    data = signed_jar(reply_entries(content), CERT, sign)
    reply = read_reply(data, str(tmp_path), CERT)
    assert reply[:4] == content[:4] and not reply.busy
    sent = {reply.module: b"\x7fELF module", reply.module + ".sgn": b"module signature",
            reply.mok_cert: b"MOK DER"}
    for path, entry in sent.items():
        with open(path, "rb") as f:
            assert f.read() == entry
    with pytest.raises(Error) as e:
        read_reply(data, str(tmp_path), OTHER_CERT)
    assert str(e.value) == "reply is signed by a certificate other than the server's"
