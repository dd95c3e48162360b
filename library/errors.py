"""The one exception type for mistakes a user can fix (bad file, bad option, bad TOML key).

Command-line entry points catch it, print its message without a traceback and exit with code 2
(a subclass may set its own `exit_code` and `label`: an interrupted run exits with 130, as a
shell reports a process stopped by Ctrl-C); anything else is a bug and keeps its traceback.
"""

import sys


class UserError(Exception):
    """A problem with the user's input: the message says which file or key, and what to do."""
    exit_code = 2
    label = "error"


def exit_on_user_error(main):
    """Run `main()`; turn a UserError into one `error: ...` line on stderr and its exit code."""
    try:
        return main()
    except UserError as e:
        print(f"{e.label}: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
