# Ported from systemtap testsuite/systemtap.server/server_locale.exp (cases reimplemented).
"""systemtap's server_locale.exp: the client's LANG reaches the server, which
takes only well-formed, harmless values and tells the client about the rest
("Server: Localization ..." lines on the client's stderr).

Cases, as upstream: LANG with an embedded newline ("Server: Localization
key=value line ..."); with a ';' ("Server: Localization value '...' contains
illegal characters"); with all of "_.-@=" (accepted, the script runs); a
French sniff test (does local stap speak French here?); a script that prints
"Bonjour" under LANG=fr_FR.utf8 and "Hello" under en_US.utf8; a script with an
unterminated string under both (French: "Ne peut trouver la guillemet", an
expected failure where French is not installed, as upstream marks it;
English: "parse error: Could not find matching closing quote" or "1 parse
error.").

Adaptations (see upstream_helpers): `-r KREL`; the server named by
HOST:PORT; pass 5 becomes -p4: "the script printed Hello/Bonjour" becomes
"the module came back" (the print itself needs the module loaded)."""

import os
import re
import subprocess

import pytest
from upstream_helpers import STAP, modules_in, pairing, pairings, vermagic  # noqa: F401  (pairings, pairing: fixtures)

pytestmark = pytest.mark.upstream

VALID = 'probe begin{printf("Hello\\n"); exit();}'
FRENCH = 'probe begin{printf("Bonjour\\n"); exit();}'
INVALID = 'probe begin{printf("Hello); exit();}'


def with_lang(pairings, pairing, krel, lang, script, cwd=None):
    return pairings.run(pairing, ["-r", krel, "-p4", "-e", script], cwd=cwd,
                        env={"LANG": lang}, server_last=True)


def module_came_back(proc, cwd, krel):
    assert proc.returncode == 0, proc.stderr
    mods = modules_in(cwd)
    assert len(mods) == 1 and vermagic(os.path.join(cwd, mods[0])) == krel, \
        (mods, proc.stderr)


def test_embedded_newline(pairings, pairing, krel):
    proc = with_lang(pairings, pairing, krel, "en_US\n.utf8", VALID)
    assert re.search(r"^Server: Localization key=value line ", proc.stderr, re.M), proc.stderr


def test_embedded_semicolon(pairings, pairing, krel):
    proc = with_lang(pairings, pairing, krel, "en_US;.utf8", VALID)
    assert re.search(r"^Server: Localization value '[^']*' contains illegal characters$",
                     proc.stderr, re.M), proc.stderr


def test_allowed_characters(pairings, pairing, krel):
    cwd = pairings.workdir()
    proc = with_lang(pairings, pairing, krel, "en_US.utf-8@toronto=test", VALID, cwd)
    module_came_back(proc, cwd, krel)
    assert "Server: Localization" not in proc.stderr, proc.stderr


@pytest.fixture(scope="module")
def french():
    """upstream's sniff: does `LANG=fr_FR.utf8 stap -V` answer in French?"""
    proc = subprocess.run([STAP, "-V"], env={"PATH": "/usr/bin:/bin", "LANG": "fr_FR.utf8"},
                          capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    if re.search(r"^options activées :.", out, re.M):
        return True
    assert re.search(r"^enabled features:.", out, re.M), out  # neither: upstream fails
    return False


def test_french_sniff(french):
    if not french:
        pytest.xfail("stap does not speak French here (no French locale or translation); "
                     "upstream marks this an expected failure too")


def test_proper_syntax_french(pairings, pairing, krel):
    cwd = pairings.workdir()
    module_came_back(with_lang(pairings, pairing, krel, "fr_FR.utf8", FRENCH, cwd), cwd, krel)


def test_proper_syntax_english(pairings, pairing, krel):
    cwd = pairings.workdir()
    module_came_back(with_lang(pairings, pairing, krel, "en_US.utf8", VALID, cwd), cwd, krel)


def test_bad_syntax_french(pairings, pairing, krel, french):
    proc = with_lang(pairings, pairing, krel, "fr_FR.utf8", INVALID)
    if not french:
        assert proc.returncode != 0
        pytest.xfail("no French translation here: upstream marks the French message an "
                     "expected failure then")
    assert "Ne peut trouver la guillemet" in proc.stdout + proc.stderr, proc.stderr


def test_bad_syntax_english(pairings, pairing, krel):
    proc = with_lang(pairings, pairing, krel, "en_US.utf8", INVALID)
    out = proc.stdout + proc.stderr
    assert re.search(r"^parse error: Could not find matching closing quote$", out, re.M) or \
        re.search(r"^1 parse error\.$", out, re.M), out
