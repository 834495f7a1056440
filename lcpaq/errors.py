"""Every error lcpaq raises on purpose. The CLI maps :class:`LcpaqError` to exit code 2.

Messages say what is wrong *and* what to change; callers never need a traceback.
"""

from __future__ import annotations


class LcpaqError(Exception):
    """Base class of all lcpaq errors (user-facing, exit code 2 in the CLI)."""


class ConfigError(LcpaqError, ValueError):
    """A user-supplied file or option is malformed (policy, device profile, budgets...)."""


class PolicyError(ConfigError):
    """A policy JSON is malformed or does not fit the model (unknown/missing layer, bad bits)."""


class ProfileError(ConfigError):
    """A device profile (hw_profiles/*.toml) is malformed; the message names the field."""


class UnknownModelError(LcpaqError, KeyError):
    """A model name is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class UnknownDataError(LcpaqError, KeyError):
    """A data spec (mnist5k, digits, imagefolder:PATH) cannot be resolved."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class TableError(LcpaqError):
    """A latency table is unreadable, corrupt, or from an incompatible schema."""


class TableSetupError(TableError):
    """A table exists at the path but was measured on another setup (host ISA, runtime versions,
    threads, settings): resuming it would mix two setups' rows."""


class MissingLatencyError(TableError):
    """A prediction needs workloads that the latency table does not hold."""


class BackendUnavailableError(LcpaqError):
    """A latency/deploy backend (ORT, TVM, RPC, lcpaq kernels) cannot be used here."""


class InfeasibleBudgetError(LcpaqError):
    """No policy over the given candidates meets every budget."""


class SolverError(LcpaqError):
    """The optimisation solver failed or returned a non-optimal status."""


class SensitivityError(LcpaqError):
    """A sensitivity report is malformed or does not match the model."""


class KernelError(LcpaqError):
    """The integer kernels got unsupported inputs (bits, dtypes, shapes)."""
