"""An agent tool that charges a payment service: a retried or duplicated agent call charges once.

Two layers keep the charge single:

- ``charge_order`` is a Strands tool wrapped with `idempotent_tool`: the model calling it again
  with the same arguments in the same session (a retried turn, another replica, a takeover
  after a crash) gets the first call's result, and the tool does not run again.
- Its POST goes through `IdempotentAsyncTransport`, which gives it an ``Idempotency-Key``
  derived from the tool call (namespace, session, tool name and arguments) and the request.
  When the tool runs again because its first attempt died before it returned (the process was
  killed while the payment service was answering), the second POST carries the same key, and
  the payment service hands back the charge it already made.

``payments`` is a stand-in payment service that honours ``Idempotency-Key`` as payment
providers do: the first request with a key makes the charge, later ones get the same charge
back (another charge under the same key is a 422); a request without a key is always charged.
``GET /charges`` lists the charges and how many requests each key got. It answers after
``PAYMENTS_DELAY`` seconds (0.2 by default).

Run the service, then one agent turn per command (the model is an offline stand-in that asks
for the tool; repeat the same command, or run it twice at once, and one charge is made)::

    uvicorn examples.payment_tool:payments --port 9000 &
    export STRANDS_DEDUP_REDIS_URL=redis://127.0.0.1:6379/0
    python -m examples.payment_tool --payments http://127.0.0.1:9000 --session s-1 \\
        --request req-1 "charge order o-7 500 cents"
    python -m examples.payment_tool --payments http://127.0.0.1:9000 --session s-1 \\
        --request req-2 "charge order o-7 500 cents"      # the client's retry, a new request id
    curl -s localhost:9000/charges

Each command prints the agent's reply as one JSON line. The tool's identity is scoped by the
session: the same charge asked for in another session is another call (``per_session=False``
makes it global within the namespace).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Header, HTTPException, Request
from pydantic import BaseModel, Field
from strands import Agent, tool
from strands.models.model import Model

from strands_dedup import Deduplicator, SessionGuard
from strands_dedup.agents import idempotent_tool
from strands_dedup.agents.strands import DedupAgent
from strands_dedup.http import IdempotentAsyncTransport

# -- the payment service (a stand-in for a provider that honours Idempotency-Key) ---------------

payments = FastAPI(title="payments")
payments.state.charges = []  # every charge made, in order
payments.state.by_key = {}  # Idempotency-Key -> {"request", "charge", "requests"}


class ChargeRequest(BaseModel):
    order_id: str = Field(min_length=1, max_length=200)
    amount_cents: int = Field(gt=0)


@payments.post("/charges")
async def create_charge(
    body: ChargeRequest, request: Request, idempotency_key: str | None = Header(None)
) -> dict[str, Any]:
    """Charge once per Idempotency-Key; a request without one is always charged."""
    state = request.app.state
    seen = state.by_key.get(idempotency_key) if idempotency_key is not None else None
    if seen is not None:
        seen["requests"] += 1
        if seen["request"] != body.model_dump():
            raise HTTPException(422, "this Idempotency-Key was used for another charge")
        charge = seen["charge"]
    else:
        charge = {"id": f"ch_{len(state.charges) + 1}", **body.model_dump()}
        state.charges.append(charge)
        if idempotency_key is not None:
            state.by_key[idempotency_key] = {
                "request": body.model_dump(),
                "charge": charge,
                "requests": 1,
            }
    await asyncio.sleep(float(os.environ.get("PAYMENTS_DELAY", "0.2")))
    return dict(charge)


@payments.get("/charges")
async def list_charges(request: Request) -> dict[str, Any]:
    """The charges made, and how many requests each Idempotency-Key got."""
    state = request.app.state
    requests = {key: seen["requests"] for key, seen in state.by_key.items()}
    return {"charges": state.charges, "requests_by_key": requests}


# -- the agent: a tool that charges, and an offline model that asks for it ----------------------


def build_agent(dedup: Deduplicator, client: httpx.AsyncClient) -> DedupAgent:
    """An agent service's `DedupAgent` whose agents can charge orders through ``client``."""

    @tool
    @idempotent_tool(dedup)
    async def charge_order(order_id: str, amount_cents: int) -> str:
        """Charge the customer of an order.

        Args:
            order_id: The order to charge.
            amount_cents: The amount, in cents.
        """
        # no Idempotency-Key here: the transport derives it from this call and the request
        response = await client.post(
            "/charges", json={"order_id": order_id, "amount_cents": amount_cents}
        )
        response.raise_for_status()  # a failed call is not stored: a retry runs it again
        charge = response.json()
        return f"charged {charge['id']}: {amount_cents} cents for order {order_id}"

    def make_agent(session_id: str) -> Agent:
        # A real service passes its model and a session_manager here.
        return Agent(model=ScriptedModel(), tools=[charge_order], callback_handler=None)

    return DedupAgent(dedup, make_agent, session_guard=SessionGuard(dedup, mode="queue"))


class ScriptedModel(Model):
    """An offline model: for "charge order ID N cents" it asks for ``charge_order``, then
    answers with the tool's result. It stands in for Bedrock, OpenAI, ... (no network)."""

    def __init__(self) -> None:
        self.config: dict[str, Any] = {"model_id": "scripted"}

    def update_config(self, **model_config: Any) -> None:
        self.config.update(model_config)

    def get_config(self) -> Any:
        return self.config

    async def structured_output(  # type: ignore[override]
        self, output_model: Any, prompt: Any, system_prompt: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        raise NotImplementedError
        yield

    async def stream(  # type: ignore[override]
        self, messages: Any, tool_specs: Any = None, system_prompt: Any = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        for event in self.events(messages[-1]["content"]):
            yield event

    @staticmethod
    def events(last: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The Bedrock-style stream events of the reply to a turn ending with ``last``."""
        results = [block["toolResult"] for block in last if "toolResult" in block]
        text = " ".join(block.get("text", "") for block in last)
        asked = re.search(r"charge order (\S+) (\d+) cents", text)
        if results:
            reply = " ".join(part.get("text", "") for r in results for part in r["content"])
            content = _text_block(f"Done: {reply}")
            stop = "end_turn"
        elif asked:
            arguments = {"order_id": asked.group(1), "amount_cents": int(asked.group(2))}
            content = [
                {
                    "contentBlockStart": {
                        "start": {"toolUse": {"toolUseId": "c1", "name": "charge_order"}}
                    }
                },
                {"contentBlockDelta": {"delta": {"toolUse": {"input": json.dumps(arguments)}}}},
                {"contentBlockStop": {}},
            ]
            stop = "tool_use"
        else:
            content = _text_block('Ask me to "charge order <id> <amount> cents".')
            stop = "end_turn"
        usage = {"inputTokens": 1, "outputTokens": 1, "totalTokens": 2}
        return [
            {"messageStart": {"role": "assistant"}},
            *content,
            {"messageStop": {"stopReason": stop}},
            {"metadata": {"usage": usage, "metrics": {"latencyMs": 0}}},
        ]


def _text_block(text: str) -> list[dict[str, Any]]:
    return [
        {"contentBlockStart": {"start": {}}},
        {"contentBlockDelta": {"delta": {"text": text}}},
        {"contentBlockStop": {}},
    ]


# -- one agent turn from the command line ---------------------------------------------------------


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("prompt")
    parser.add_argument("--payments", required=True, help="The payment service's base URL.")
    parser.add_argument("--session", required=True, help="The conversation.")
    parser.add_argument("--request", required=True, help="The turn's idempotency token.")
    parser.add_argument(
        "--redis-url", default=os.environ.get("STRANDS_DEDUP_REDIS_URL", "memory://")
    )
    parser.add_argument("--namespace", default="payments-agent")
    parser.add_argument("--lease-ttl", type=float, default=10.0)
    args = parser.parse_args()
    transport = IdempotentAsyncTransport()
    async with (
        Deduplicator.from_url(
            args.redis_url, namespace=args.namespace, lease_ttl=args.lease_ttl
        ) as dedup,
        httpx.AsyncClient(base_url=args.payments, transport=transport, timeout=30) as client,
    ):
        agent = build_agent(dedup, client)
        result = await agent.invoke_async(
            args.prompt, session_id=args.session, idempotency_token=args.request
        )
    print(json.dumps({"reply": str(result).strip(), "pid": os.getpid()}), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
