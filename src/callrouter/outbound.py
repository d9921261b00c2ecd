"""Outbound calls (API ``POST /api/v1/calls/outbound``), the asyncio side.

How it works: ``OutboundDialer.place`` checks the request against the store — the
destination is E.164, the number exists and has an active trunk with an outbound address
(its ``transfer_trunk_id``), the assistant (given, or the number's) has a runtime or the
default pool one — and every bad field is a 422 naming it. It resolves the trunk's digest
credentials and the caller id (the trunk's ``outbound_number`` when set, else the number),
builds a ``ports.OutboundCall`` and hands it to the SIP thread (``CallControl.place``),
where the service applies capacity and drain like to an INVITE and starts the call's
session: the customer is dialled through the trunk, then the runtime, then both are
bridged. The API answers once the SIP thread took the call (``dialing``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from callrouter.domain import session as s
from callrouter.domain.models import PhoneNumber, Trunk
from callrouter.domain.numbers import normalise
from callrouter.domain.sipuri import runtime_request_uri
from callrouter.errors import (
    EngineTimeout,
    EngineUnavailable,
    FieldProblem,
    InvalidNumber,
    ValidationError,
)
from callrouter.ports import Accepted, OutboundCall, Store
from callrouter.service import CONTROL_TIMEOUT, CallService


@dataclass(frozen=True)
class OutboundRequest:
    destination: str
    number_id: uuid.UUID | None
    assistant_id: uuid.UUID | None = None


class OutboundDialer:
    def __init__(self, service: CallService, store: Store, decrypt: Callable[[bytes], str],
                 region: str, timeout: float = CONTROL_TIMEOUT) -> None:
        self._service = service
        self._store = store
        self._decrypt = decrypt
        self._region = region
        self._timeout = timeout

    async def place(self, request: OutboundRequest) -> uuid.UUID:
        """The new call's id. Raises ``ValidationError`` (422, naming the field),
        ``EngineUnavailable`` (503: engine down, draining, at capacity), ``EngineTimeout``."""
        call = await self._resolve(request)
        control = self._service.control
        if control is None:
            raise EngineUnavailable("the SIP engine is not running")
        future = control.place(call)
        try:
            answer = await asyncio.wait_for(asyncio.wrap_future(future), self._timeout)
        except TimeoutError as exc:
            raise EngineTimeout(
                f"the SIP engine did not answer within {self._timeout:g} s") from exc
        if not isinstance(answer, Accepted):
            raise EngineUnavailable(f"the router cannot place calls now: {answer.reason}")
        return answer.call_id

    async def _resolve(self, request: OutboundRequest) -> OutboundCall:
        destination = self._destination(request.destination)
        number = await self._number(request.number_id)
        trunk = await self._trunk(number)
        assistant_id = request.assistant_id or number.assistant_id
        targets = await self._targets(assistant_id, "assistant_id" if request.assistant_id
                                      else "number_id")
        assert assistant_id is not None  # _targets refused a missing one
        credentials = None
        if trunk.username:
            secret = await self._store.get_trunk_password(trunk.id)
            credentials = (trunk.username, self._decrypt(secret) if secret else "")
        caller_id = trunk.outbound_number or number.phone_number
        uri = f"sip:{destination}@{trunk.address};transport={trunk.transport}"
        return OutboundCall(
            destination=destination, number=number.phone_number, number_id=number.id,
            assistant_id=assistant_id, trunk_id=trunk.id,
            targets=tuple(runtime_request_uri(t, str(assistant_id)) for t in targets),
            customer=s.DialCustomer(uri, credentials, caller_id))

    def _destination(self, raw: str) -> str:
        text = raw.strip()
        try:
            if text.startswith("+"):
                return normalise(text, self._region)
        except InvalidNumber:
            pass
        raise _invalid("destination", "must be an E.164 number (+ and digits)")

    async def _number(self, number_id: uuid.UUID | None) -> PhoneNumber:
        if number_id is None:
            raise _invalid("number_id", "is required: the number the call is placed from")
        number = await self._store.get_number(number_id)
        if number is None:
            raise _invalid("number_id", f"no number with id {number_id}")
        return number

    async def _trunk(self, number: PhoneNumber) -> Trunk:
        trunk_id = number.transfer_trunk_id
        trunk = await self._store.get_trunk(trunk_id) if trunk_id else None
        if trunk is None or not trunk.is_active or not trunk.host:
            raise _invalid("number_id", "the number has no active trunk with an "
                                        "outbound_address (its transfer_trunk_id)")
        return trunk

    async def _targets(self, assistant_id: uuid.UUID | None, field: str) -> tuple[str, ...]:
        if assistant_id is None:
            raise _invalid(field, "the number has no assistant; give assistant_id")
        assistant = await self._store.get_assistant(assistant_id)
        if assistant is None:
            raise _invalid(field, f"no assistant with id {assistant_id}")
        own = (assistant.runtime_uri,) if assistant.runtime_uri else ()
        targets = own + tuple(u for u in self._service.pool.order() if u not in own)
        if not targets:
            raise _invalid(field, "the assistant has no runtime_uri and runtime.pool is empty")
        return targets


def _invalid(field: str, reason: str) -> ValidationError:
    return ValidationError(f"{field}: {reason}", details=[FieldProblem(field, reason)])
