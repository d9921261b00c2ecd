"""The router's exception tree.

Outcomes are values (a rejected call is ``domain.routing.Reject``), failures are
exceptions. Every exception that can reach a peer knows what to answer with:

    CallrouterError                    base; ``status`` = HTTP status, ``sip_status`` = SIP
    ├── ConfigError                    invalid configuration; lists every problem
    ├── ValidationError (422/400)      bad input; ``details`` names each bad field
    │   └── InvalidNumber (400)        not a phone number
    ├── NotFound (404)                 unknown id
    ├── Conflict (409)                 duplicate number, object still referenced
    │   └── CommandRefused (409)       the call's state refuses a control command now
    ├── StoreError (500)               the database failed (translated in store/ only)
    │   └── StoreUnavailable (503)     the database cannot be reached now (PostgreSQL)
    ├── EngineError (500, SIP 500)     pjsua2 failed (translated in sip/ only)
    ├── EngineUnavailable (503)        no SIP engine to carry a control command
    ├── EngineTimeout (504)            the SIP engine did not rule on a command in time
    └── StartupError                   the router cannot start (a listener, the data
                                       directory); the message names the address or path

Foreign exceptions (sqlite3, pjsua2.Error) are translated in exactly one function
per adapter, with ``raise ... from exc``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FieldProblem:
    """One bad field in a request: where it is and what is wrong with it."""

    field: str
    message: str


class CallrouterError(Exception):
    status: int = 500
    sip_status: int = 500
    code: str = "internal_error"
    public: bool = False  # a 5xx whose message tells the client nothing internal

    def __init__(self, message: str, *, details: list[FieldProblem] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class ConfigError(CallrouterError):
    code = "invalid_config"

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))
        self.problems = problems


class ValidationError(CallrouterError):
    status = 422
    sip_status = 400
    code = "validation_error"


class InvalidNumber(ValidationError):
    status = 400
    code = "invalid_phone_number"


class NotFound(CallrouterError):
    status = 404
    sip_status = 404
    code = "not_found"


class Conflict(CallrouterError):
    status = 409
    code = "conflict"


class CommandRefused(Conflict):
    code = "command_refused"


class StoreError(CallrouterError):
    code = "store_error"


class StoreUnavailable(StoreError):
    """The database is unreachable (down, restarting, network): the router goes on routing
    from memory and spools call records; what needs the database answers 503."""

    status = 503
    code = "database_unavailable"
    public = True


class EngineError(CallrouterError):
    code = "engine_error"


class EngineUnavailable(CallrouterError):
    status = 503
    code = "engine_unavailable"
    public = True


class EngineTimeout(CallrouterError):
    status = 504
    code = "engine_timeout"
    public = True


class StartupError(CallrouterError):
    code = "startup_error"
