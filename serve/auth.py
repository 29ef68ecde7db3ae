"""Optional bearer API keys: stored as sha256 digests, compared in constant time, optionally scoped.

No keys configured (and no $TPV_API_KEYS) means the API is open: bind it to 127.0.0.1 then. With keys, every route
but /v1/health needs `Authorization: Bearer <key>` (401 otherwise). A key limited to `tasks`/`compositions` may
name only those (403 otherwise); such a key cannot use `vector_id` terms, whose task the ingress cannot see.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass

from fastapi import Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from tpv.errors import TpvError
from tpv.names import Name

KEYS_ENV = "TPV_API_KEYS"  # comma-separated plain keys, each unrestricted (for a quick start; prefer hashes)


class Unauthorized(TpvError):
    """No key, or a key that matches none configured."""


class Forbidden(TpvError):
    """A valid key used outside its scope."""


def digest(key: str) -> str:
    """The stored form of a key: sha256 hex of its UTF-8 bytes (`tpv` never keeps the key itself)."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKey(BaseModel):
    """One key: its sha256 (`python -c "from serve.auth import digest; print(digest('KEY'))"`) and its scope."""

    model_config = ConfigDict(extra="forbid")

    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    name: str = Field("key", max_length=64, description="shown in logs, never the key")
    tasks: list[Name] | None = Field(None, description="None: any task; else only these tasks")
    compositions: list[Name] | None = Field(None, description="None: any stored composition; else only these")


class AuthSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    keys: list[ApiKey] = Field(default_factory=list)

    def resolved(self) -> list[ApiKey]:
        """The configured keys plus those in $TPV_API_KEYS (hashed here)."""
        env = [k.strip() for k in os.environ.get(KEYS_ENV, "").split(",") if k.strip()]
        return self.keys + [ApiKey(sha256=digest(k), name=f"env-{i}") for i, k in enumerate(env)]


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's scope, or the open API (`key is None`)."""

    key: ApiKey | None

    def allow(self, tasks: set[str], compositions: set[str], vector_ids: bool) -> None:
        """Raise Forbidden when the request names something outside the key's scope."""
        if self.key is None:
            return
        if self.key.tasks is not None:
            outside = sorted(tasks - set(self.key.tasks))
            if outside:
                raise Forbidden(f"this API key may not use task(s) {outside}")
            if vector_ids:
                raise Forbidden("this API key is limited to named tasks; 'vector_id' terms are not allowed")
        if self.key.compositions is not None:
            outside = sorted(compositions - set(self.key.compositions))
            if outside:
                raise Forbidden(f"this API key may not use composition(s) {outside}")

    def allow_composition(self, composition, task: str | None = None) -> None:
        """`allow` for what a request names: its composition (a stored name, or inline terms) and its task."""
        tasks = {task} if task is not None else set()
        if isinstance(composition, str):
            self.allow(tasks, {composition}, False)
            return
        tasks |= {t.task for t in composition.terms if t.task is not None}
        self.allow(tasks, set(), any(t.vector_id is not None for t in composition.terms))

    def allow_model(self, name: str, as_task: bool | None = None) -> None:
        """An OpenAI `model` id: allowed when the key may use it as a task or as a composition (`as_task` None:
        either, before the store is asked), one wording either way so the answer does not say which it is."""
        if self.key is None:
            return
        task_ok = self.key.tasks is None or name in self.key.tasks
        comp_ok = self.key.compositions is None or name in self.key.compositions
        if not {None: task_ok or comp_ok, True: task_ok, False: comp_ok}[as_task]:
            raise Forbidden(f"this API key may not use the model {name!r}")

    def visible(self, task: str) -> bool:
        return self.key is None or self.key.tasks is None or task in self.key.tasks


class Keyring:
    """The keys of one ingress replica; `check` is the only way in."""

    def __init__(self, keys: list[ApiKey]) -> None:
        self.keys = keys

    @property
    def open(self) -> bool:
        return not self.keys

    def check(self, token: str | None) -> Principal:
        if self.open:
            return Principal(None)
        if not token:
            raise Unauthorized("this API needs a key: send 'Authorization: Bearer <key>'")
        presented = digest(token)
        found = None
        for key in self.keys:  # every key is compared, so the time does not say which one nearly matched
            if hmac.compare_digest(presented, key.sha256):
                found = key
        if found is None:
            raise Unauthorized("the API key is not valid")
        return Principal(found)


# One per process: the ingress's reconfigure() fills it, the route dependency reads it.
KEYRING = Keyring([])


def configure(settings: AuthSettings) -> None:
    KEYRING.keys = settings.resolved()


_bearer = HTTPBearer(auto_error=False, description="an API key, when the server has keys configured")


def principal(credentials: HTTPAuthorizationCredentials | None = Security(_bearer)) -> Principal:
    """The routes' dependency: the caller's key (401 without a valid one, when keys are configured)."""
    return KEYRING.check(credentials.credentials if credentials is not None else None)
