"""The one exception type for mistakes a user can fix (bad file, bad option, bad TOML key),
`read_utf8`, the text-file reader whose failures are such mistakes (every module reads its text
files through it), and `listing`, the short list of names such a message shows.

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


def read_utf8(path, what):
    """The text of a UTF-8 file, without the byte-order mark Windows editors put first; a
    UserError naming `what` (e.g. "prompt file") and the path if it cannot be read or decoded."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return f.read()
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        "re-save it as UTF-8") from None


MAX_LISTED = 12     # names an error message shows before "... (N more)"


def listing(names):
    """Sorted names, comma-separated, cut after MAX_LISTED with a count of the rest."""
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" ... ({len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")
