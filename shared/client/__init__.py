"""The teacher service's client, for your own training loop: httpx, numpy and safetensors are all it needs.

    from shared.client import TeacherClient

    teacher = TeacherClient("http://127.0.0.1:8000", "mnist", temperature=4.0)
    probs = teacher.soft_targets(x)  # (B, K): numpy for a numpy x, a torch tensor on x's device for a torch one

AsyncTeacherClient is the same client for asyncio. Both take one service or a list of replicas, fail over between
them, retry with jittered backoff (honouring Retry-After), ask for cached rows by key first, and check every answer
before it is returned; the trainer's RemoteTeacher is this client. docs/client.md documents it.
"""

from shared.client.aio import AsyncTeacherClient
from shared.client.backoff import Backoff
from shared.client.errors import TeacherAnswerError, TeacherRequestError, TeacherUnavailable
from shared.client.listing import MemberInfo, TeacherInfo
from shared.client.sync import TeacherClient
from shared.wire import CacheMode

__all__ = [
    "AsyncTeacherClient",
    "Backoff",
    "CacheMode",
    "MemberInfo",
    "TeacherAnswerError",
    "TeacherClient",
    "TeacherInfo",
    "TeacherRequestError",
    "TeacherUnavailable",
]
