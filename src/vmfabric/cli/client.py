"""The CLI's HTTP client for the controller's API."""

from __future__ import annotations

from typing import Any

import httpx

from vmfabric import config


class CliError(Exception):
    """An error to print as one line; `code` 2 for bad input, 1 for failures."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class ApiClient:
    """Calls the API at VMFABRIC_URL and turns problem documents into CliError."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        self.url = url or config.api_url()
        headers = {}
        if token := token or config.api_token():
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def request(self, method: str, path: str, body: object | None = None) -> Any:
        """The decoded JSON answer (None for 204), or CliError."""
        try:
            response = self._http.request(method, f"/api/v1{path}", json=body)
        except httpx.TransportError as error:
            raise CliError(
                f"cannot reach the vmfabric controller at {self.url} ({error}); "
                "start it with `vmfabric serve` or `vmfabric lab up`",
                1,
            ) from None
        if response.status_code >= 400:
            raise CliError(_problem_text(response), 2 if response.status_code < 500 else 1)
        return None if response.status_code == 204 else response.json()

    def get(self, path: str) -> Any:
        """GET `path`."""
        return self.request("GET", path)

    def post(self, path: str, body: object | None = None) -> Any:
        """POST `body` to `path`."""
        return self.request("POST", path, body)

    def delete(self, path: str) -> Any:
        """DELETE `path`."""
        return self.request("DELETE", path)


def _problem_text(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return f"HTTP {response.status_code}: {response.text.strip()[:200]}"
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return f"HTTP {response.status_code}: {body}"
