"""icgate's decisions inside a `litellm.Router`, in the same process.

LiteLLM keeps what it is good at: deployments, provider keys, translation to providers' own APIs, retries.
icgate decides: for a routed model (a group named like one of the policy's `routed_models`) it answers from
its cache, or picks the deployment by its router and prepends in-context examples for the small tier; and it
records the outcome (request log, cache entry, route sample) as for its own calls.

    async with icgate.Gateway(policy="policy.yaml", data_dir="d") as gw:
        router = litellm.Router(model_list=[
            {"model_name": "auto", "litellm_params": {"model": "gpt-4o-mini"}, "model_info": {"id": "small"}},
            {"model_name": "auto", "litellm_params": {"model": "gpt-4o"}, "model_info": {"id": "large"}},
        ])
        attach(gw, router)
        await router.acompletion(model="auto", messages=[...])

A deployment is the policy's backend of the same name (`model_info.id` = a backend's `name`), so the
policy's tiers and prices drive the choice. What litellm 1.106.2's extension points allow, read from its
source (docs/middleware.md has the details):

- `Router.set_custom_routing_strategy` is consulted on every Router call, sync and async, retries included,
  with the live request kwargs: a strategy may choose the deployment, replace `messages` (examples) and set
  `mock_response`, which answers without calling the provider (a cache hit).
- A `CustomLogger`'s success and failure events carry the answer (a stream's, assembled) and the metadata
  the strategy set: the outcome, for the record stage.

What they do not allow, and so this path does not do: hold an admission slot for LiteLLM's call (admission
only chooses where its own measure of load is lowest), fall back on icgate's terms (LiteLLM retries and
falls back as configured), or put `x-icgate-*` headers on the response (the decisions are in the request
log, under the id in `metadata["icgate_request_id"]`). For all of those, give LiteLLM a wrapped client
instead (`litellm.acompletion(model="openai/auto", client=gw.wrap(openai.AsyncOpenAI(...)))`): then icgate
makes the call itself, and its headers arrive in `response._hidden_params["additional_headers"]`.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Coroutine
from typing import Any, TypeVar

import litellm
import litellm.exceptions as litellm_errors
from litellm.integrations.custom_logger import CustomLogger
from litellm.router import Router
from litellm.types.router import CustomRoutingStrategyBase
from pydantic import ValidationError

from icgate.gateway.api.bounds import check_request_bounds
from icgate.gateway.api.errors import invalid_request
from icgate.gateway.api.schemas import ChatCompletionRequest
from icgate.gateway.errors import GatewayError
from icgate.gateway.inprocess.gateway import Gateway
from icgate.gateway.pipeline.advise import Advice
from icgate.gateway.records import RequestContext

T = TypeVar("T")
KEY = "icgate_request_id"  # in the call's metadata: which advice a LiteLLM call follows
# Request fields that change icgate's decisions (cacheability, length, tools); the rest is LiteLLM's.
FIELDS = (
    "temperature",
    "top_p",
    "n",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "seed",
    "stream",
    "tools",
    "tool_choice",
    "response_format",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "user",
)


def litellm_error(exc: GatewayError, model: str) -> Exception:
    """A refusal as the exception LiteLLM itself would raise for that status, so callers' handlers work."""
    provider, message = "icgate", exc.message
    if exc.status_code == 400:
        return litellm_errors.BadRequestError(message, model, provider)
    if exc.status_code == 401:
        return litellm_errors.AuthenticationError(message, provider, model)
    if exc.status_code == 404:
        return litellm_errors.NotFoundError(message, model, provider)
    if exc.status_code == 429:
        return litellm_errors.RateLimitError(message, provider, model, headers=exc.headers)
    if exc.status_code == 503:
        return litellm_errors.ServiceUnavailableError(message, provider, model)
    return litellm_errors.APIError(exc.status_code, message, provider, model)


def response_dict(response: Any) -> dict[str, Any] | None:
    if isinstance(response, dict):
        return response
    dump = getattr(response, "model_dump", None)
    return dict(dump()) if callable(dump) else None


class IcgateRouting(CustomRoutingStrategyBase, CustomLogger):
    """The Router's routing strategy and the callback that reports each call's outcome: one object, as the
    outcome belongs to the advice the strategy gave."""

    def __init__(
        self, gateway: Gateway, router: Router, tenant: str | None = None, max_pending: int = 10_000
    ) -> None:
        CustomLogger.__init__(self)
        # LiteLLM keeps one logger per class and public str/int fields: a name of its own keeps this one
        # from being taken for another router's (whose outcomes it would then never hear of).
        self.name = f"icgate-{id(self):x}"
        self.gateway = gateway
        self.router = router
        self.tenant = gateway.tenant_source(tenant)
        self.max_pending = max_pending
        # Advice given and not settled yet, by request id; bounded: an outcome never reported is dropped.
        self._pending: OrderedDict[str, Advice] = OrderedDict()

    # --- choosing ---------------------------------------------------------------------------------------

    async def async_get_available_deployment(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, Any]] | None = None,
        input: str | list[Any] | None = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        deployments = [d for d in self.router.model_list if d.get("model_name") == model]
        if not deployments:
            raise litellm_errors.BadRequestError(f"no deployment in model group '{model}'", model, "icgate")
        if messages is None or request_kwargs is None or model not in self.gateway.policy.routed_models:
            return dict(deployments[0])  # not a routed chat request: nothing for icgate to decide
        metadata = request_kwargs.get("metadata")
        if not isinstance(metadata, dict):
            metadata = request_kwargs["metadata"] = {}
        advice = self._pending.get(metadata.get(KEY, ""))  # a retry of an advised call keeps its advice
        if advice is None:
            advice = await self._on_gateway_loop(self._advise(model, messages, request_kwargs))
            metadata[KEY] = advice.ctx.request_id
        if advice.response is not None:  # a cache hit, recorded already: LiteLLM returns it, calls no one
            request_kwargs["mock_response"] = litellm.ModelResponse(**advice.response)
            return dict(deployments[0])
        assert advice.backend is not None and advice.body is not None
        self._remember(advice)
        request_kwargs["messages"] = advice.body["messages"]  # replaces the caller's, which stay untouched
        for deployment in deployments:
            if (deployment.get("model_info") or {}).get("id") == advice.backend.name:
                return dict(deployment)
        raise litellm_errors.BadRequestError(
            f"icgate chose backend '{advice.backend.name}', which is no deployment of '{model}' "
            "(give each deployment `model_info.id` = the name of a backend in the policy)",
            model,
            "icgate",
        )

    def get_available_deployment(  # type: ignore[override]
        self,
        model: str,
        messages: list[dict[str, Any]] | None = None,
        input: str | list[Any] | None = None,
        specific_deployment: bool | None = False,
        request_kwargs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        work = self.async_get_available_deployment(
            model, messages, input, specific_deployment, request_kwargs
        )
        return self.gateway.bridge.call(work)

    async def _advise(
        self, model: str, messages: list[dict[str, Any]], request_kwargs: dict[str, Any]
    ) -> Advice:
        body = {
            "model": model,
            "messages": messages,
            **{k: request_kwargs[k] for k in FIELDS if k in request_kwargs},
        }
        try:
            try:
                fields = ChatCompletionRequest.model_validate(body).model_dump(exclude_unset=True)
            except ValidationError as exc:
                raise invalid_request(exc.errors()) from None
            check_request_bounds(fields, self.gateway.policy.server)
            tenant = await self.tenant() if self.tenant is not None else None
            return await self.gateway.core.pipeline.advise(
                RequestContext(endpoint="chat", body=fields), None, tenant
            )
        except GatewayError as exc:
            raise litellm_error(exc, model) from None

    def _remember(self, advice: Advice) -> None:
        self._pending[advice.ctx.request_id] = advice
        while len(self._pending) > self.max_pending:
            self._pending.popitem(last=False)

    # --- the outcome --------------------------------------------------------------------------------------

    async def async_log_success_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self._settle_async(kwargs, response_dict(response_obj), None)

    async def async_log_failure_event(
        self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any
    ) -> None:
        await self._settle_async(kwargs, None, failure_of(kwargs))

    def log_success_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._settle_sync(kwargs, response_dict(response_obj), None)

    def log_failure_event(self, kwargs: Any, response_obj: Any, start_time: Any, end_time: Any) -> None:
        self._settle_sync(kwargs, None, failure_of(kwargs))

    def _take(self, kwargs: Any) -> Advice | None:
        """The advice this call followed, once: LiteLLM may report one outcome by its sync and async hooks."""
        metadata = ((kwargs or {}).get("litellm_params") or {}).get("metadata") or {}
        return self._pending.pop(str(metadata.get(KEY, "")), None)

    async def _settle_async(
        self, kwargs: Any, response: dict[str, Any] | None, error: tuple[str, int] | None
    ) -> None:
        advice = self._take(kwargs)
        if advice is not None:
            await self._on_gateway_loop(self._settle(advice, response, error))

    def _settle_sync(
        self, kwargs: Any, response: dict[str, Any] | None, error: tuple[str, int] | None
    ) -> None:
        advice = self._take(kwargs)
        if advice is not None:
            self.gateway.bridge.call(self._settle(advice, response, error))

    async def _settle(
        self, advice: Advice, response: dict[str, Any] | None, error: tuple[str, int] | None
    ) -> None:
        pipeline = self.gateway.core.pipeline
        if error is None:
            pipeline.settle(advice, response)
        else:
            pipeline.settle(advice, None, error=error[0], status=error[1])

    async def _on_gateway_loop(self, work: Coroutine[Any, Any, T]) -> T:
        bridge = self.gateway.bridge
        if asyncio.get_running_loop() is bridge.loop:
            return await work
        return await bridge.acall(work)


def failure_of(kwargs: Any) -> tuple[str, int]:
    """The failed call's exception class and HTTP status (502 when it has none), for the request log."""
    exc = (kwargs or {}).get("exception")
    status = getattr(exc, "status_code", None)
    return (type(exc).__name__ if exc is not None else "unknown", status if isinstance(status, int) else 502)


def attach(gateway: Gateway, router: Router, *, tenant: str | None = None) -> IcgateRouting:
    """Let icgate route `router`'s routed model groups. LiteLLM's callbacks are process-wide
    (`litellm.callbacks`): `detach` removes this one again (before the gateway closes)."""
    routing = IcgateRouting(gateway, router, tenant)
    router.set_custom_routing_strategy(routing)
    litellm.logging_callback_manager.add_litellm_callback(routing)
    return routing


def detach(routing: IcgateRouting) -> None:
    """Stop hearing of outcomes: out of every list LiteLLM has copied the callback into."""
    litellm.logging_callback_manager.remove_callback_from_all_lists(routing)
