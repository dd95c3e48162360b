"""The one exception type for mistakes a user can fix (bad file, bad option, bad TOML key).

Command-line entry points catch it, print its message without a traceback and exit with code 2;
anything else is a bug and keeps its traceback.
"""

import sys


class UserError(Exception):
    """A problem with the user's input: the message says which file or key, and what to do."""


def exit_on_user_error(main):
    """Run `main()`; turn a UserError into one `error: ...` line on stderr and exit code 2."""
    try:
        return main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
