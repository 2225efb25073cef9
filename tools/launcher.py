#!/usr/bin/python3
"""The one program behind every installed command: `make install` puts it beside the two modules
and links each command name in bindir to it.  It runs the main() of the module that provides the
command it was called as, which dispatches on that name again.

A script is compiled from source at every start, an imported module from its byte code, which
`make install` writes: so this file stays short and the modules are imported.  A client command
imports stap_client alone, so that a client-only installation needs no stap_server.
"""
import os
import sys

HERE = os.path.realpath(__file__)  # __file__ is the link a command was called by
sys.path.insert(0, os.path.dirname(HERE))
import stap_client  # noqa: E402  (from beside this file, not from the working directory)


def command_name(argv):
    """argv[0]'s base name, or the first argument where the launcher is run by its own name (as
    `python3 stap_client.py COMMAND` runs the module)."""
    name = os.path.basename(argv[0])
    if name == os.path.basename(HERE) and len(argv) > 1:
        return argv[1]
    return name


def server_commands():
    """The server module's commands, {} where only the client is installed."""
    try:
        import stap_server
    except ModuleNotFoundError as e:
        if e.name != "stap_server":
            raise
        return {}
    return stap_server.COMMANDS


def main(argv):
    name = command_name(argv)
    if name in stap_client.COMMANDS:
        return stap_client.main()
    server = server_commands()
    if name in server:
        return sys.modules["stap_server"].main()
    print(f"{name}: ERROR: not a command of the stap-server utilities; "
          f"they are: {', '.join(sorted({**stap_client.COMMANDS, **server}))}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
