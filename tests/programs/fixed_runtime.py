"""fixed_runtime.py ROOT RELEASE TOP: print the -R directory that a stap run without our server
needs for RELEASE's headers (made under TOP by the server's own table of runtime fixes), or an
empty line.  shared.fixed_runtime_for runs it: a process of its own for the server's state."""

import sys
import types

sys.path.insert(0, sys.argv[1])
import stap_server as s  # noqa: E402

fixed = s.runtime_copy(types.SimpleNamespace(runtime=None, cache_dir=sys.argv[3]),
                       s.header_trees(sys.argv[2]))
print(fixed.path if fixed else "")
