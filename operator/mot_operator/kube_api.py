"""The Kubernetes API calls the controller makes (the official client, run in threads): list a run's
Pods, list the Nodes that carry a label (the GPUs' memory), read Kueue's Workloads, patch a MoTRun's
status, create Jobs, JobSets and Services (AlreadyExists = adopt), suspend, resume and delete Jobs and
JobSets, post Events; and GET a trainer's progress from its Pod."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from concurrent.futures import ThreadPoolExecutor

import kopf

from . import naming
from .planner import MESSAGE_LIMIT
from .spec import GROUP, PLURAL, VERSION

# The official client blocks: calls run in this many threads (over as many pooled connections), so
# a burst of finished Jobs across many runs is not queued behind a handful of slow requests. More is
# not better: with 100 runs finishing at once on 2 cores, 32 threads fighting over the GIL gave a
# merge-creation p99 of 1.2-1.35 s, 8 threads 0.81-0.93 s, 4 threads 1.3-2.0 s (bench/operator).
API_THREADS = 8
PROGRESS_TIMEOUT_SECONDS = 2.0
MERGE_PATCH = "application/merge-patch+json"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
JOBSETS = ("jobset.x-k8s.io", "v1alpha2", "jobsets")  # group, version, plural (jobs.JOBSET_API_VERSION)
log = logging.getLogger(__name__)


class KubeApi:
    """The calls, each a coroutine (the client's in API_THREADS threads); one per operator process."""

    def __init__(self, api_client=None):
        from kubernetes import client

        if api_client is None:
            config = client.Configuration.get_default_copy()
            config.connection_pool_maxsize = API_THREADS
            api_client = client.ApiClient(config)
        self._client = api_client
        self._threads = ThreadPoolExecutor(API_THREADS, thread_name_prefix="kube-api")
        self.batch = client.BatchV1Api(self._client)
        self.core = client.CoreV1Api(self._client)
        self.custom = client.CustomObjectsApi(self._client)
        self._http = None  # an aiohttp session for the trainers' progress, made in the event loop

    @staticmethod
    def _status(error) -> int | None:
        return getattr(error, "status", None)

    async def _call(self, fn, *args, **kwargs) -> bytes:
        """Run a client call (with _preload_content=False: no model objects) in a thread; its body."""
        return await asyncio.get_running_loop().run_in_executor(
            self._threads, functools.partial(_body_of, fn, *args, _preload_content=False, **kwargs))

    async def run_pods(self, namespace: str, run_label: str) -> list[dict]:
        """The Pods of a run's Jobs (for termination messages): one list call however many finished."""
        data = await self._call(self.core.list_namespaced_pod, namespace,
                                label_selector=f"{naming.LABEL_RUN}={run_label}")
        items = json.loads(data).get("items") or []
        return [p for p in items if ((p.get("metadata") or {}).get("labels") or {}).get(naming.LABEL_RUN) == run_label]

    async def nodes(self, label: str) -> list[dict]:
        """The Nodes that carry `label` (any value): their metadata only is used."""
        data = await self._call(self.core.list_node, label_selector=label)
        return json.loads(data).get("items") or []

    async def workloads(self, namespace: str, job_uid: str) -> list[dict]:
        """Kueue's Workloads of a Job (labelled with its uid by Kueue)."""
        from kubernetes.client.exceptions import ApiException

        for version in KUEUE_VERSIONS:
            try:
                data = await self._call(self.custom.list_namespaced_custom_object, "kueue.x-k8s.io", version,
                                        namespace, "workloads", label_selector=f"kueue.x-k8s.io/job-uid={job_uid}")
            except ApiException as error:
                if self._status(error) == 404 and version != KUEUE_VERSIONS[-1]:
                    continue  # an older Kueue serves only v1beta1
                raise
            return json.loads(data).get("items") or []
        return []

    async def progress(self, url: str) -> dict | None:
        """The trainer's latest progress record from its Pod (None when it cannot be read: a Pod
        just started or stopping, a NetworkPolicy in the way; the status keeps the last one)."""
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROGRESS_TIMEOUT_SECONDS))
        try:
            async with self._http.get(url) as response:
                if response.status != 200:
                    return None
                record = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as error:
            log.debug("reading progress from %s failed: %s", url, error)
            return None
        return record if isinstance(record, dict) and "step" in record else None

    async def patch_status(self, namespace: str, name: str, patch: dict) -> None:
        await self._call(
            self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name,
            {"status": patch}, _content_type=MERGE_PATCH)

    async def create(self, obj: dict) -> bool:
        """True when created; False when it already exists (a deterministic name: adopt it)."""
        from kubernetes.client.exceptions import ApiException

        namespace = obj["metadata"]["namespace"]
        try:
            if obj["kind"] == "JobSet":
                await self._call(self.custom.create_namespaced_custom_object, *JOBSETS[:2], namespace, JOBSETS[2], obj)
            else:
                call = self.batch.create_namespaced_job if obj["kind"] == "Job" else self.core.create_namespaced_service
                await self._call(call, namespace, obj)
        except ApiException as error:
            if self._status(error) == 409:
                return False
            raise
        return True

    async def jobsets_served(self) -> bool:
        """Whether the cluster serves JobSets (the JobSet CRD is installed) at the version rendered."""
        from kubernetes.client.exceptions import ApiException

        try:
            data = await self._call(self.custom.get_api_resources, *JOBSETS[:2])
        except ApiException as error:
            if self._status(error) == 404:
                return False
            raise
        return any(r.get("name") == JOBSETS[2] for r in json.loads(data).get("resources") or [])

    async def set_suspend(self, namespace: str, job: str, suspend: bool, kind: str = "Job") -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "JobSet":
                await self._call(self.custom.patch_namespaced_custom_object, *JOBSETS[:2], namespace, JOBSETS[2], job,
                                 {"spec": {"suspend": suspend}}, _content_type=MERGE_PATCH)
            else:
                await self._call(self.batch.patch_namespaced_job, job, namespace, {"spec": {"suspend": suspend}},
                                 _content_type=MERGE_PATCH)
        except ApiException as error:
            if self._status(error) != 404:
                raise

    def event(self, body: dict, event) -> None:
        """A Kubernetes Event on the MoTRun (Kopf posts it in the background)."""
        kopf.event(body, type=event.type, reason=event.reason, message=event.message[:MESSAGE_LIMIT])

    async def delete_job(self, namespace: str, job: str, kind: str = "Job") -> None:
        from kubernetes.client.exceptions import ApiException

        try:
            if kind == "JobSet":
                await self._call(self.custom.delete_namespaced_custom_object, *JOBSETS[:2], namespace, JOBSETS[2], job,
                                 propagation_policy="Background")
            else:
                await self._call(self.batch.delete_namespaced_job, job, namespace,
                                 propagation_policy="Background")
        except ApiException as error:
            if self._status(error) != 404:
                raise


def _body_of(fn, *args, **kwargs) -> bytes:
    """Call, read the whole response and give its connection back to the pool. (An unread raw
    response keeps its connection until garbage-collected, which then closes it: every request paid
    for a new TCP connection, and a burst of 100 runs for thousands of them.)"""
    response = fn(*args, **kwargs)
    try:
        return response.data
    finally:
        response.release_conn()
