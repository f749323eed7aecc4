"""The robeval exception tree: every user-facing failure is a RobevalError with a message that
names the problem, the value seen, what was expected and how to fix it."""

from __future__ import annotations


class RobevalError(Exception):
    """Base class of every error robeval raises on purpose."""


class InvalidParameterError(RobevalError, ValueError):
    """A parameter has a value outside its domain (eps < 0, unknown norm, ...)."""


class InputShapeError(RobevalError, ValueError):
    """An input array does not have the shape the model expects."""


class DataRangeError(RobevalError, ValueError):
    """Input data contain NaN/inf or values outside the model's input domain."""


class DataNotFoundError(RobevalError, FileNotFoundError):
    """A data set could not be found in any of the places robeval looked."""


class ModelLoadError(RobevalError):
    """A model file is missing, corrupt, of an unknown format, or unsafe to load."""


class UnsupportedOpError(RobevalError):
    """One or more operations of a model cannot be converted; lists every one at once."""

    def __init__(self, problems: list[tuple[str, str]], framework: str, supported: list[str] | None = None):
        self.problems = list(problems)
        self.framework = framework
        lines = [f"{len(self.problems)} unsupported operation(s) in this {framework} model:"]
        lines += [f"  - {op} (node '{name}')" for op, name in self.problems]
        if supported:
            lines.append("supported: " + ", ".join(sorted(supported)))
        lines.append("fix: replace these layers with supported ones, or open an issue asking for them")
        super().__init__("\n".join(lines))


class UnsupportedRuleError(RobevalError):
    """An op has no rule for a method (e.g. no CROWN relaxation for this op)."""

    def __init__(self, op: str, rule: str, node: str = "?"):
        self.op, self.rule, self.node = op, rule, node
        super().__init__(
            f"op '{op}' (node '{node}') has no '{rule}' rule, so this method cannot bound this model; "
            f"use a method that supports every op (see `robeval info MODEL`)"
        )


class NetworkError(RobevalError):
    """An error raised while walking a network, with the node that caused it."""


class BackendError(RobevalError):
    """The requested array backend (e.g. CuPy on 'cuda') is not available."""


class FidelityError(RobevalError):
    """Native model outputs and the converted network's outputs disagree."""


class SpecError(RobevalError, ValueError):
    """A verification specification (e.g. a VNN-LIB file) is malformed or unsupported; names the file,
    line and column when it comes from a file."""

    def __init__(self, message: str, file: str | None = None, line: int | None = None, column: int | None = None):
        self.message, self.file, self.line, self.column = message, file, line, column
        where = file or ""
        if line is not None:
            where += f"{':' if where else 'line '}{line}" + (f":{column}" if column is not None else "")
        super().__init__(f"{where}: {message}" if where else message)
