"""KServe v2 over gRPC (`inference.GRPCInferenceService`, with Triton's repository calls) and `grpc.health.v1.Health`.

Every API server process serves it beside HTTP, on the same event loop, on its own SO_REUSEPORT socket of the gRPC
port. It holds nothing of its own: a call goes to the data plane HTTP calls too (the same routing to a model version,
the same readiness, `infer` through the same dispatcher, so a gRPC request joins the batches HTTP requests join),
and a tensor is checked by v2's shared rules, with the same messages. A client mistake is the status code
`errors.GRPC_CODES` gives its HTTP status; the request bytes are parsed here rather than by grpc, so a malformed
message is INVALID_ARGUMENT naming the message, not INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message

import modelship
from modelship.protos import health_pb2 as health
from modelship.protos import inference_pb2 as pb
from modelship.serving import v2
from modelship.serving.dataplane import CANARY_KEY, authorized
from modelship.serving.errors import GRPC_CODES, RequestError
from modelship.serving.metrics import metrics

if TYPE_CHECKING:
    from modelship.serving.dataplane import DataPlane

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
HEALTH = "grpc.health.v1.Health"
CODES = {status: getattr(grpc.StatusCode, name) for status, name in GRPC_CODES.items()}
CALL: contextvars.ContextVar[grpc.aio.ServicerContext | None] = contextvars.ContextVar("call", default=None)
MISSING_KEY = "missing or wrong API key; send it as x-api-key or authorization: Bearer metadata"
INTERNAL = "internal server error; see the server log"
OPEN = frozenset({"ServerLive", "ServerReady"})  # as /v2/health/live and /v2/health/ready: no API key needed
WATCH_EVERY = 0.5  # seconds between the readiness looks of a health Watch
Handler = Callable[[Any], Awaitable[Message]]


class Service:
    """The gRPC server of one API server process: made before the fork, started inside the process's event loop."""

    def __init__(self, plane: DataPlane, host: str, port: int, api_key: str | None, max_bytes: int) -> None:
        self.plane = plane
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = max_bytes
        self.server: grpc.aio.Server | None = None
        self.stopping = asyncio.Event()
        self.counters: dict[tuple[str, str], Any] = {}

    async def start(self) -> None:
        options = [
            ("grpc.so_reuseport", 1),  # every API server binds the port; the kernel balances connections
            ("grpc.max_receive_message_length", self.max_bytes),  # --max-payload-mb, as HTTP; per model below
            ("grpc.max_send_message_length", -1),
        ]
        self.server = grpc.aio.server(options=options)
        # registered with grpc's core (as protoc's _pb2_grpc code does), not looked up as generic handlers per call
        self.server.add_registered_method_handlers(SERVICE, self.inference_methods())
        self.server.add_registered_method_handlers(HEALTH, self.health_methods())
        if self.server.add_insecure_port(self.address) == 0:
            raise OSError(f"gRPC cannot listen on {self.address}")
        await self.server.start()

    async def stop(self, grace: float | None) -> None:
        """Refuse new calls at once; answer those in flight for up to `grace` seconds (health watches end at once,
        NOT_SERVING: a draining server is not a reason to wait)."""
        self.stopping.set()
        if self.server is not None:
            await self.server.stop(grace)

    # ------------------------------------------------------------------------------------------ plumbing

    def inference_methods(self) -> dict[str, grpc.RpcMethodHandler]:
        calls: dict[str, tuple[type[Message], Handler]] = {
            "ServerLive": (pb.ServerLiveRequest, self.server_live),
            "ServerReady": (pb.ServerReadyRequest, self.server_ready),
            "ModelReady": (pb.ModelReadyRequest, self.model_ready),
            "ServerMetadata": (pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": (pb.ModelMetadataRequest, self.model_metadata),
            "ModelInfer": (pb.ModelInferRequest, self.model_infer),
            "ModelConfig": (pb.ModelConfigRequest, self.model_config),
            "ModelStatistics": (pb.ModelStatisticsRequest, self.model_statistics),
            "RepositoryIndex": (pb.RepositoryIndexRequest, self.repository_index),
            "RepositoryModelLoad": (pb.RepositoryModelLoadRequest, self.repository_load),
            "RepositoryModelUnload": (pb.RepositoryModelUnloadRequest, self.repository_unload),
        }
        methods = {name: grpc.unary_unary_rpc_method_handler(self.unary(name, *c)) for name, c in calls.items()}
        methods["ModelStreamInfer"] = grpc.stream_stream_rpc_method_handler(self.stream_infer)
        return methods

    def health_methods(self) -> dict[str, grpc.RpcMethodHandler]:
        check = self.unary("Check", health.HealthCheckRequest, self.health_check, service=HEALTH)
        return {
            "Check": grpc.unary_unary_rpc_method_handler(check),
            "Watch": grpc.unary_stream_rpc_method_handler(self.health_watch),
        }

    def unary(self, name: str, kind: type[Message], fn: Handler, service: str = SERVICE) -> Callable[..., Any]:
        """A method: the API key, the message parsed, the answer serialized, mistakes as status codes, metrics."""
        needs_key = self.api_key is not None and name not in OPEN and service == SERVICE
        method = f"/{service}/{name}"

        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            start, code = time.perf_counter(), grpc.StatusCode.OK
            CALL.set(context)
            try:
                if needs_key:
                    assert self.api_key is not None
                    if not authorized(self.api_key, metadata(context)):
                        raise RequestError(MISSING_KEY, 401)
                try:
                    request = kind.FromString(raw)
                except DecodeError as e:
                    raise RequestError(f"the {kind.__name__} message cannot be parsed ({e})") from None
                return (await fn(request)).SerializeToString()
            except RequestError as e:
                code = CODES.get(e.status, grpc.StatusCode.INTERNAL)
                message = e.grpc
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception:
                log.exception("unhandled error answering %s", method)
                code, message = grpc.StatusCode.INTERNAL, INTERNAL
            finally:
                self.count(method, code, time.perf_counter() - start)
            await context.abort(code, message)
            raise AssertionError("unreachable: abort raises")

        return handle

    def count(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        key = (method, code.name)
        if key not in self.counters:
            m = metrics()
            self.counters[key] = (m.grpc_requests.labels(method, code.name), m.grpc_latency.labels(method))
        counter, latency = self.counters[key]
        counter.inc()
        latency.observe(seconds)

    # ------------------------------------------------------------------------------------------ the service

    async def server_live(self, request: pb.ServerLiveRequest) -> Message:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest) -> Message:
        return pb.ServerReadyResponse(ready=self.plane.ready())

    async def model_ready(self, request: pb.ModelReadyRequest) -> Message:
        """ready: false, not an error, for a model or version that is not READY or not there (as Triton answers)."""
        try:
            return pb.ModelReadyResponse(ready=self.plane.model_ready(request.name, request.version or None))
        except RequestError as e:
            if e.status != 404:
                raise
            return pb.ModelReadyResponse(ready=False)

    async def server_metadata(self, request: pb.ServerMetadataRequest) -> Message:
        return pb.ServerMetadataResponse(name="modelship", version=modelship.__version__, extensions=v2.EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest) -> Message:
        doc = self.plane.catalog.metadata(request.name, request.version or None)
        tensors = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=doc["name"],
            versions=doc["versions"],
            platform=doc["platform"],
            inputs=[tensors(**t) for t in doc["inputs"]],
            outputs=[tensors(**t) for t in doc["outputs"]],
        )

    async def model_infer(self, request: pb.ModelInferRequest) -> Message:
        key = None
        if self.plane.catalog.table.rollouts:  # a canary's sticky key: only looked up while one may need it
            context = CALL.get()
            key = metadata(context).get(CANARY_KEY) if context is not None else None
        served, pair = self.plane.route(request.model_name, request.model_version or None, key)
        model = served.model
        size = request.ByteSize()
        if size > served.max_message_bytes:
            c, h, w = model.shape
            raise RequestError(
                f"the request is {size} bytes, over the {served.max_message_bytes} byte limit for model "
                f"{model.name!r} (its largest batch, {model.max_batch} x {c}x{h}x{w} FP32)",
                413,
            )
        x = infer_input(request, model)
        k = None
        for i, o in enumerate(request.outputs):
            v2.check_output(o.name, model)
            if v2.CLASSIFICATION in o.parameters:
                k = classification(o.parameters[v2.CLASSIFICATION], model, f"outputs[{i}].parameters")
        logits = await self.plane.infer(served, x, "grpc", request.id or None, pair)
        response = pb.ModelInferResponse(model_name=model.name, model_version=served.version, id=request.id)
        if k is None:
            response.outputs.add(name=model.output_name, datatype="FP32", shape=logits.shape)
            response.raw_output_contents.append(np.ascontiguousarray(logits, "<f4").tobytes())
        else:  # Triton's classification extension: BYTES rows of "score:index:label"
            rows = v2.classify(logits, model, k)
            response.outputs.add(name=model.output_name, datatype="BYTES", shape=rows.shape)
            response.raw_output_contents.append(v2.bytes_tensor(rows))
        return response

    async def model_config(self, request: pb.ModelConfigRequest) -> Message:
        doc = self.plane.config(request.name, request.version or None)
        return pb.ModelConfigResponse(config=json_format.ParseDict(doc, pb.ModelConfig()))

    async def model_statistics(self, request: pb.ModelStatisticsRequest) -> Message:
        """Every READY version's statistics with no name, as Triton answers."""
        doc = self.plane.statistics(request.name or None, request.version or None)
        return json_format.ParseDict(doc, pb.ModelStatisticsResponse())

    async def stream_infer(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        """ModelStreamInfer (tritonclient's start_stream / async_stream_infer): each request on the stream is answered
        as ModelInfer answers it, all of them in flight at once, so they join the same batches; the answers come in
        the order they are ready, each with its request's id. A request that fails is a response with its
        error_message, and the stream goes on."""
        start, method = time.perf_counter(), f"/{SERVICE}/ModelStreamInfer"
        CALL.set(context)
        if self.api_key is not None and not authorized(self.api_key, metadata(context)):
            self.count(method, grpc.StatusCode.UNAUTHENTICATED, 0.0)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY)
        answers: asyncio.Queue[bytes | None] = asyncio.Queue()
        reader = asyncio.ensure_future(self.read_stream(requests, answers))
        try:
            while (answer := await answers.get()) is not None:
                yield answer
        finally:
            reader.cancel()
            self.count(method, grpc.StatusCode.OK, time.perf_counter() - start)

    async def read_stream(self, requests: AsyncIterator[bytes], answers: asyncio.Queue[bytes | None]) -> None:
        """Each request of a stream answered on a task of its own; None once the client has closed its side and
        every answer is in."""
        tasks = set()
        async for raw in requests:
            tasks.add(asyncio.ensure_future(self.stream_answer(raw, answers)))
        await asyncio.gather(*tasks)
        await answers.put(None)

    async def stream_answer(self, raw: bytes, answers: asyncio.Queue[bytes | None]) -> None:
        try:
            try:
                request = pb.ModelInferRequest.FromString(raw)
            except DecodeError as e:
                raise RequestError(f"the ModelInferRequest message cannot be parsed ({e})") from None
            response = pb.ModelStreamInferResponse(infer_response=await self.model_infer(request))
        except RequestError as e:
            response = pb.ModelStreamInferResponse(error_message=e.grpc)
        except Exception:
            log.exception("unhandled error answering a ModelStreamInfer request")
            response = pb.ModelStreamInferResponse(error_message=INTERNAL)
        await answers.put(response.SerializeToString())

    async def repository_index(self, request: pb.RepositoryIndexRequest) -> Message:
        rows = self.plane.index(ready_only=request.ready)
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[
                index(name=r["name"], version=r["version"], state=r["state"], reason=r["reason"] or "") for r in rows
            ]
        )

    async def repository_load(self, request: pb.RepositoryModelLoadRequest) -> Message:
        await self.plane.repository_change("load", request.model_name, list(request.parameters))
        return pb.RepositoryModelLoadResponse()

    async def repository_unload(self, request: pb.RepositoryModelUnloadRequest) -> Message:
        await self.plane.repository_change("unload", request.model_name, list(request.parameters))
        return pb.RepositoryModelUnloadResponse()

    # ------------------------------------------------------------------------------------------ health

    def serving_status(self, service: str) -> health.HealthCheckResponse.ServingStatus:
        """SERVING while `service` can answer: the server ("" or the inference service) or one model by name."""
        try:
            ready = self.plane.ready() if service in ("", SERVICE) else self.plane.model_ready(service)
        except RequestError as e:
            if e.status != 404:
                raise
            return health.HealthCheckResponse.SERVICE_UNKNOWN
        return health.HealthCheckResponse.SERVING if ready else health.HealthCheckResponse.NOT_SERVING

    async def health_check(self, request: health.HealthCheckRequest) -> Message:
        status = self.serving_status(request.service)
        if status == health.HealthCheckResponse.SERVICE_UNKNOWN:
            raise RequestError(f"unknown service {request.service!r}; ask for '' or a model's name", 404)
        return health.HealthCheckResponse(status=status)

    async def health_watch(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        """The status now, then each change, until the client goes (grpc.health.v1's Watch)."""
        try:
            service = health.HealthCheckRequest.FromString(raw).service
        except DecodeError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the HealthCheckRequest cannot be parsed ({e})")
        last = None
        while not self.stopping.is_set():
            status = self.serving_status(service)
            if status != last:
                yield health.HealthCheckResponse(status=status).SerializeToString()
                last = status
            with contextlib.suppress(asyncio.TimeoutError):  # (TimeoutError itself from Python 3.11 on)
                await asyncio.wait_for(self.stopping.wait(), WATCH_EVERY)
        if last != health.HealthCheckResponse.NOT_SERVING:
            yield health.HealthCheckResponse(status=health.HealthCheckResponse.NOT_SERVING).SerializeToString()


def metadata(context: grpc.aio.ServicerContext) -> dict[bytes, bytes]:
    """A call's metadata as the API key check reads headers."""
    return {k.encode(): v.encode() for k, v in context.invocation_metadata() or () if isinstance(v, str)}


def classification(parameter: pb.InferParameter, model: v2.ServedModel, where: str) -> int:
    """The classification extension's k from an output's InferParameter (tritonclient sends int64_param)."""
    choice = parameter.WhichOneof("parameter_choice")
    value = getattr(parameter, choice) if choice else None
    return v2.check_classification(value, model, f"{where}.{v2.CLASSIFICATION}")  # a string or a float is refused


def infer_input(request: pb.ModelInferRequest, model: v2.ServedModel) -> np.ndarray:
    """The one input tensor of a ModelInfer -> float32 [N, C, H, W]: `raw_input_contents` (a view, no copy) or
    typed `contents.fp32_contents`, checked as HTTP checks a v2 input. (Each field is read once: a protobuf field
    read costs as much as a check, and this runs for every request.)"""
    inputs, raw = request.inputs, request.raw_input_contents
    if len(inputs) != 1:
        raise RequestError(f"inputs must be a list with one tensor named {model.input_name!r}")
    t = inputs[0]
    shape = list(t.shape)
    v2.check_input(t.name, t.datatype, shape, model)
    typed = [f.name for f, _ in t.contents.ListFields()] if t.HasField("contents") else []
    if raw:
        if typed:
            raise RequestError("input has both raw_input_contents and contents; send one")
        if len(raw) != 1:
            raise RequestError(f"raw_input_contents has {len(raw)} entries; expected one, for the one input")
        return v2.raw_tensor(raw[0], shape, "raw_input_contents[0]")
    if not typed:
        raise RequestError("input needs contents.fp32_contents or raw_input_contents")
    if typed != ["fp32_contents"]:
        raise RequestError(f"input contents hold {', '.join(typed)}; an FP32 input takes fp32_contents")
    values = np.asarray(t.contents.fp32_contents, dtype=np.float32)
    if values.size != int(np.prod(shape)):
        raise RequestError(
            f"contents.fp32_contents has {values.size} values; shape {shape} needs {int(np.prod(shape))}"
        )
    return values.reshape(shape)
