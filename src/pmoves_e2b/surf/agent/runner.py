"""Agent mode as e2b-surf runs it: one session's loop on its desktop and browser.

``make_runner(settings)`` is the runner registered for mode ``agent``. It opens the request's URL
in the session's browser, then runs the loop (``loop.py``) with the model of the request
(``model``, else ``E2B_SURF_MODEL``), recording every turn as a step (``kind`` ``action``: the
screenshot after it, the model's reasoning, the actions, errors; ``note`` for a safety check that
waits for a person). A person takes over and hands back through the session's take-over
endpoints (the loop waits between turns).
"""

from __future__ import annotations

from typing import Any

from pmoves_e2b.config import Settings
from pmoves_e2b.desktop.desktops import DesktopError
from pmoves_e2b.surf.agent.computer import DesktopComputer, for_model, navigate
from pmoves_e2b.surf.agent.loop import StepRecord, Takeover, run_agent
from pmoves_e2b.surf.agent.providers import Display, make_provider, parse_model
from pmoves_e2b.surf.models import SurfError
from pmoves_e2b.surf.run import DeadlineExceeded, RunContext, Runner, Stopped


def describe(action: dict[str, Any]) -> str:
    """One line a person reads in the step list: ``click (412, 300)``, ``type "Ada"``."""
    kind = action.get("type", "?")
    if "x" in action and action.get("x") is not None:
        return f"{kind} ({action['x']}, {action['y']})"
    if kind == "drag":
        return f"drag {tuple(action['from'])} -> {tuple(action['to'])}"
    if kind == "type":
        text = str(action.get("text", ""))
        return f"type {text[:60]!r}" + ("…" if len(text) > 60 else "")
    if kind == "key":
        keys = action.get("keys")
        return f"key {'+'.join(keys) if isinstance(keys, list) else keys}"
    if kind == "navigate":
        return f"navigate {action.get('url')}"
    if kind == "wait":
        return f"wait {action.get('ms')} ms"
    return str(kind)


def make_runner(settings: Settings) -> Runner:
    async def run(ctx: RunContext) -> dict[str, Any]:
        request = ctx.request
        try:
            spec = parse_model(request.model or settings.e2b_surf_model)
        except ValueError as exc:
            raise SurfError("invalid_model", str(exc)) from None
        computer = DesktopComputer(ctx.ops, ctx.desktop_id, Display(ctx.browser.width, ctx.browser.height), ctx.page)
        seen = for_model(computer)
        try:
            provider = make_provider(spec, settings, task=request.task or "", display=seen.display)
        except ValueError as exc:
            raise SurfError("model_not_configured", str(exc)) from None
        ctx.check()
        opened: dict[str, Any] = {"url": request.url, "action": f"navigate {request.url}"}
        try:
            await navigate(ctx.page, request.url)
        except DesktopError as exc:  # the model still gets the screen (an error page) and may recover
            opened["errors"] = [exc.message]
        await ctx.record_step("navigate", opened)

        async def record(step: StepRecord) -> None:
            data: dict[str, Any] = {
                "turn": step.index,
                "reasoning": step.reasoning,
                "action": "; ".join(describe(a) for a in step.actions),
                "actions": step.actions,
                "errors": step.errors,
                "done": step.done,
                "model_ms": round(step.model_s * 1000),
                "overhead_ms": round((step.total_s - step.model_s - step.settle_s) * 1000),
            }
            if step.done:
                data["message"] = step.message
            if step.note:
                data["note"] = step.note
            await ctx.record_step("note" if step.note else "action", data, screenshot=step.screenshot)

        result = await run_agent(
            seen,
            provider,
            max_steps=request.max_steps or settings.e2b_surf_max_steps,
            deadline=ctx.deadline,
            stop=ctx.stop_requested,
            takeover=Takeover(ctx.taken_over, ctx.handed_back),
            record=record,
        )
        if result.state == "stopped":
            raise Stopped()
        if result.error_code == "timeout":
            raise DeadlineExceeded(ctx.timeout_s)
        if result.state == "failed":
            raise SurfError(result.error_code or "agent_failed", result.message)
        final_url = ctx.page.url
        return {"message": result.message, "steps": result.steps, "model": str(spec), "final_url": final_url}

    return run
