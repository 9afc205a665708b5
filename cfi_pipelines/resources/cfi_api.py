"""The CFI API resource: configuration in, a :class:`~cfi_pipelines.fallback.api_client.CfiApiClient` out.

``base_url`` and ``token`` come from ``CFI_API_URL`` / ``CFI_API_TOKEN`` as
``dagster.EnvVar`` (see :func:`cfi_api_resource`), so the token never shows
in the UI or the logs.
"""

import dagster as dg
from pydantic import Field

from cfi_pipelines.fallback.api_client import (
    DEFAULT_MAX_CLOCK_SKEW_S,
    DEFAULT_MAX_PAGES,
    DEFAULT_MAX_SNAPSHOT_SECONDS,
    DEFAULT_RESPONSE_DEADLINE_S,
    CfiApiClient,
    CfiApiNotConfigured,
)
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
    response_deadline_s: float = Field(
        default=DEFAULT_RESPONSE_DEADLINE_S,
        description="longest total time to receive one response (read_timeout_s is per read)",
    )
    max_snapshot_seconds: float = Field(
        default=DEFAULT_MAX_SNAPSHOT_SECONDS,
        description="longest time to read a whole view (all pages, retries included)",
    )
    max_pages: int = Field(default=DEFAULT_MAX_PAGES, description="most pages in one view")
    max_clock_skew_s: float = Field(
        default=DEFAULT_MAX_CLOCK_SKEW_S,
        description="how far in the future the API's as_of may be (clock skew)",
    )

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
            response_deadline_s=self.response_deadline_s,
            max_snapshot_seconds=self.max_snapshot_seconds,
            max_pages=self.max_pages,
            max_clock_skew_s=self.max_clock_skew_s,
        )


def cfi_api_resource(settings: Settings) -> CfiApiResource:
    """The resource from the environment (EnvVar when set, so secrets stay out of the UI)."""
    del settings  # both values are secrets or may embed one: they go in as EnvVar
    return CfiApiResource(
        base_url=env_or_default("CFI_API_URL", ""),
        token=env_or_default("CFI_API_TOKEN", ""),
    )
