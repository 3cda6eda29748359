"""The two ways a command stops on its user's input or its data: one `error:` line per problem, no traceback."""

import sys


class UsageError(Exception):
    """Bad flags or inputs. Each entry of `problems` is one line for the user."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class TrainingError(RuntimeError):
    """A run that cannot go on (e.g. the loss became NaN); the message says what to do."""


def exit_on_usage_error(function):
    """Run `function(argv)`; a UsageError becomes `error: ...` lines and exit status 2, a TrainingError
    one `error: ...` line and exit status 1 (no traceback: the message is the whole story)."""

    def wrapper(argv=None):
        try:
            return function(argv)
        except UsageError as error:
            for problem in error.problems:
                print(f"error: {problem}", file=sys.stderr)
            sys.exit(2)
        except TrainingError as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(1)

    wrapper.__name__ = function.__name__
    wrapper.__doc__ = function.__doc__
    return wrapper
