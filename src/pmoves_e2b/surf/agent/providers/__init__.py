"""Model providers, chosen by configuration: ``provider:model`` (E2B_SURF_MODEL or a run's ``model``).

- ``openai``: OpenAI Responses API, computer-use tool; ``OPENAI_API_KEY``, ``E2B_SURF_OPENAI_BASE_URL``.
- ``anthropic``: Anthropic Messages API, computer-use tool; ``ANTHROPIC_API_KEY``, ``E2B_SURF_ANTHROPIC_BASE_URL``.
- ``openai-compatible``: any OpenAI-compatible vision chat model (vLLM, Ollama, LM Studio);
  ``E2B_SURF_CHAT_BASE_URL`` (required), ``E2B_SURF_CHAT_API_KEY`` (optional).
"""

from __future__ import annotations

from dataclasses import dataclass

from pmoves_e2b.config import Settings
from pmoves_e2b.surf.agent.providers.anthropic import AnthropicComputerUse
from pmoves_e2b.surf.agent.providers.base import Display, Provider, ProviderError, Turn
from pmoves_e2b.surf.agent.providers.openai_chat import OpenAIChat
from pmoves_e2b.surf.agent.providers.openai_responses import OpenAIResponses

__all__ = ["Display", "ModelSpec", "Provider", "ProviderError", "Turn", "make_provider", "parse_model"]

PROVIDERS: dict[str, type[Provider]] = {
    "openai": OpenAIResponses,
    "anthropic": AnthropicComputerUse,
    "openai-compatible": OpenAIChat,
}


@dataclass(frozen=True)
class ModelSpec:
    provider: str
    model: str

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


def parse_model(spec: str) -> ModelSpec:
    """``provider:model`` -> ModelSpec; ValueError naming the providers otherwise (a 400 for a run)."""
    provider, sep, model = spec.partition(":")
    if not sep or not model.strip() or provider not in PROVIDERS:
        raise ValueError(f"model {spec!r} must be 'provider:model' with provider one of {', '.join(PROVIDERS)}")
    return ModelSpec(provider, model.strip())


def check_configured(spec: ModelSpec, settings: Settings) -> None:
    """A run cannot work without its provider's key or base URL: say so before it starts."""
    if spec.provider == "openai" and settings.openai_api_key is None:
        raise ValueError("agent model openai:* needs OPENAI_API_KEY in e2b-surf's environment")
    if spec.provider == "anthropic" and settings.anthropic_api_key is None:
        raise ValueError("agent model anthropic:* needs ANTHROPIC_API_KEY in e2b-surf's environment")
    if spec.provider == "openai-compatible" and not settings.e2b_surf_chat_base_url:
        raise ValueError("agent model openai-compatible:* needs E2B_SURF_CHAT_BASE_URL (e.g. http://host:11434/v1)")


def make_provider(spec: ModelSpec, settings: Settings, *, task: str, display: Display) -> Provider:
    check_configured(spec, settings)
    base_url, key = {
        "openai": (settings.e2b_surf_openai_base_url, settings.openai_api_key),
        "anthropic": (settings.e2b_surf_anthropic_base_url, settings.anthropic_api_key),
        "openai-compatible": (settings.e2b_surf_chat_base_url or "", settings.e2b_surf_chat_api_key),
    }[spec.provider]
    return PROVIDERS[spec.provider](
        model=spec.model,
        task=task,
        display=display,
        base_url=base_url,
        api_key=key.get_secret_value() if key is not None else None,
        timeout_s=settings.e2b_surf_model_timeout,
    )
