"""The CFI API resource: configuration in, a :class:`~cfi_pipelines.fallback.api_client.CfiApiClient` out.

``base_url`` and ``token`` come from ``CFI_API_URL`` / ``CFI_API_TOKEN`` as
``dagster.EnvVar`` (see :func:`cfi_api_resource`), so the token never shows
in the UI or the logs.
"""

import dagster as dg
from pydantic import Field

from cfi_pipelines.fallback.api_client import CfiApiClient, CfiApiNotConfigured
from cfi_pipelines.settings import Settings, env_or_default


class CfiApiResource(dg.ConfigurableResource):
    """CFI's HTTP API (fallback snapshots). Empty ``base_url``: fallback unavailable."""

    base_url: str = Field(default="", description="CFI_API_URL, e.g. https://api.cfi.example")
    token: str = Field(default="", description="Bearer token (CFI_API_TOKEN); pass as EnvVar")
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 30.0
    max_retries: int = Field(default=4, description="retries on connection errors, 429 and 5xx")
    backoff_s: float = Field(default=0.5, description="first backoff; doubles at each retry")
    max_backoff_s: float = Field(default=60.0, description="longest wait, Retry-After included")
    page_size: int = 1000
    max_concurrency: int = Field(default=4, description="requests in flight through one client")

    @property
    def configured(self) -> bool:
        return bool(self.base_url)

    def client(self) -> CfiApiClient:
        """A new client (close it, or use it as a context manager)."""
        if not self.base_url:
            raise CfiApiNotConfigured(
                "CFI_API_URL is not set: the fallback to CFI's HTTP API is unavailable. "
                "Set CFI_API_URL and CFI_API_TOKEN (or run `cfi-pipelines fake-cfi-api` locally)."
            )
        return CfiApiClient(
            self.base_url,
            self.token,
            connect_timeout_s=self.connect_timeout_s,
            read_timeout_s=self.read_timeout_s,
            max_retries=self.max_retries,
            backoff_s=self.backoff_s,
            max_backoff_s=self.max_backoff_s,
            page_size=self.page_size,
            max_concurrency=self.max_concurrency,
        )


def cfi_api_resource(settings: Settings) -> CfiApiResource:
    """The resource from the environment (EnvVar when set, so secrets stay out of the UI)."""
    del settings  # both values are secrets or may embed one: they go in as EnvVar
    return CfiApiResource(
        base_url=env_or_default("CFI_API_URL", ""),
        token=env_or_default("CFI_API_TOKEN", ""),
    )
