# stap-server utilities in Python: install, test, demo.
#
#   make demo                 start a real server and compile through it (root, Debian)
#   make check                install missing packages, run the tests
#   make test-unit            the unit tier alone (-m unit: no root, network or stap; seconds)
#   make lint                 ruff on the modules, tests and benchmarks (ruff.toml)
#   make install [DESTDIR=... prefix=... sysconfdir=... PYTHON=...]
#   make uninstall            with the same variables as install
#   make deb                  Debian packages in build/deb/ (tools/build-deb)

prefix     = /usr/local
exec_prefix = $(prefix)
bindir     = $(exec_prefix)/bin
pkglibdir  = $(prefix)/lib/stap-server
datarootdir = $(prefix)/share
mandir     = $(datarootdir)/man
man8dir    = $(mandir)/man8
sysconfdir = /etc
DESTDIR    =
# Debian's python3 has the python3-nss bindings; a pyenv python3 on PATH has not.
PYTHON     = /usr/bin/python3

INSTALL    = install
RUFF       = ruff

MODULES         = stap_client.py stap_server.py
CLIENT_COMMANDS = stap-client stap-find-servers stap-add-server-cert
SERVER_COMMANDS = stap-serverd stap-start-server stap-stop-server stap-find-or-start-server
COMMANDS        = $(CLIENT_COMMANDS) $(SERVER_COMMANDS)
MANPAGES        = stap-server.8 $(addsuffix .8,$(COMMANDS))

.PHONY: all install uninstall check test-unit demo bench lint clean deb

all:
	@echo "Nothing to build.  Targets: install uninstall check demo bench lint clean deb"

install:
	$(INSTALL) -d -m 0755 $(DESTDIR)$(pkglibdir) $(DESTDIR)$(bindir) $(DESTDIR)$(man8dir)
	for m in $(MODULES); do \
	  sed -e '1s|^#!.*|#!$(PYTHON)|' \
	      -e 's|^SYSCONFDIR = ".*"  # make install rewrites this line$$|SYSCONFDIR = "$(sysconfdir)"  # make install rewrites this line|' \
	      $$m > $(DESTDIR)$(pkglibdir)/$$m.tmp && \
	  chmod 0755 $(DESTDIR)$(pkglibdir)/$$m.tmp && \
	  mv -f $(DESTDIR)$(pkglibdir)/$$m.tmp $(DESTDIR)$(pkglibdir)/$$m || exit 1; \
	done
	grep -q '^SYSCONFDIR = "$(sysconfdir)"  # make install rewrites this line$$' \
	  $(DESTDIR)$(pkglibdir)/stap_client.py || \
	  { echo "install: the SYSCONFDIR line of stap_client.py was not rewritten" >&2; exit 1; }
	$(PYTHON) -m compileall -q -d $(pkglibdir) $(addprefix $(DESTDIR)$(pkglibdir)/,$(MODULES))
	# One launcher beside the modules, and each command a symlink to it: it imports
	# the module of the command it was called as.  Python compiles the script it runs
	# from source every time, and reuses the byte code only of modules it imports.
	sed -e '1s|^#!.*|#!$(PYTHON)|' tools/launcher.py > $(DESTDIR)$(pkglibdir)/launcher.tmp && \
	  chmod 0755 $(DESTDIR)$(pkglibdir)/launcher.tmp && \
	  mv -f $(DESTDIR)$(pkglibdir)/launcher.tmp $(DESTDIR)$(pkglibdir)/launcher
	rel=$$(realpath -m --relative-to=$(bindir) $(pkglibdir)) && \
	for c in $(COMMANDS); do \
	  ln -sfn $$rel/launcher $(DESTDIR)$(bindir)/$$c || exit 1; \
	done
	for p in $(MANPAGES); do \
	  $(INSTALL) -m 0644 man/$$p $(DESTDIR)$(man8dir)/$$p || exit 1; \
	done

uninstall:
	for c in $(COMMANDS); do rm -f $(DESTDIR)$(bindir)/$$c; done
	for p in $(MANPAGES); do rm -f $(DESTDIR)$(man8dir)/$$p; done
	for m in $(MODULES) launcher; do rm -f $(DESTDIR)$(pkglibdir)/$$m; done
	rm -rf $(DESTDIR)$(pkglibdir)/__pycache__
	-rmdir $(DESTDIR)$(pkglibdir) 2>/dev/null

check:
	tools/install-deps
	$(PYTHON) -m pytest -v -rs tests

# Each test file names its tier (setup.cfg lists them); -m picks one.
# Only the files that declare the unit tier are imported: importing the others (hypothesis, the
# test servers' helpers) would cost more than the unit tests take to run.
test-unit:
	$(PYTHON) -m pytest -q -m unit $$(grep -l '^pytestmark = pytest.mark.unit$$' tests/test_*.py)

demo:
	PYTHON=$(PYTHON) tools/demo

deb:
	tools/build-deb

bench:
	$(PYTHON) bench/run.py

lint:
	@command -v $(RUFF) >/dev/null 2>&1 || \
	  { echo "lint: $(RUFF) is not installed (tools/install-deps installs it)" >&2; exit 1; }
	$(RUFF) check $(MODULES) tools/launcher.py tests bench

clean:
	rm -rf __pycache__ tests/__pycache__ bench/__pycache__ .pytest_cache .ruff_cache build \
	  *.egg-info
