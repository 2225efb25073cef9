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

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
import stap_client  # noqa: E402  (from beside this file, not from the working directory)


def names(commands, argv):
    """Whether argv names one of commands: its base name, or the first argument (as the modules
    accept it) when the base name is no command."""
    return os.path.basename(argv[0]) in commands or (len(argv) > 1 and argv[1] in commands)


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
    if names(stap_client.COMMANDS, argv):
        return stap_client.main()
    server = server_commands()
    if names(server, argv):
        return sys.modules["stap_server"].main()
    print(f"{os.path.basename(argv[0])}: ERROR: not a command of the stap-server utilities; "
          f"they are: {', '.join(sorted({**stap_client.COMMANDS, **server}))}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
