"""Errors of the HTTP API, all in OpenAI's shape.

Every answer under ``/v1`` that is not a success has the body
``{"error": {"message", "type", "param", "code"}}``: bad input is a 400, a
request over a size limit a 413 (`chatbot.limits`), an unknown route a 404
(a 405 for a known one with any other method), a busy model a 503, and a
failure of the server itself a 500 in the same shape; never a traceback. The OpenAPI schema says the same
(FastAPI would document a 422 that this server never sends).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount

API_PREFIX = "/v1"
TOO_LARGE = 413  # every size limit, whichever it is
TOO_LARGE_CODE = "request_too_large"
# pydantic's error types for a string or list over its max_length: size limits too.
_TOO_LONG = {"string_too_long", "too_long", "bytes_too_long"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str = "invalid_request_error", headers=None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers, self.param = status, message, code, headers, param


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """What every failed request under /v1 answers."""

    error: ErrorDetail


def error_type(status: int) -> str:
    return "server_error" if status >= 500 else "invalid_request_error"


def error_body(message: str, code: str, *, status: int = 400, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_response(status: int, message: str, code: str, *, param: str | None = None, headers=None):
    return JSONResponse(error_body(message, code, status=status, param=param), status_code=status,
                        headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message, exc.code, param=exc.param, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        problems, params, too_long = [], [], True
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
            problems.append(f"{where}: {err.get('msg', 'invalid')}")
            params.append(where)
            too_long = too_long and err.get("type") in _TOO_LONG
        message = "; ".join(problems) or "invalid request"
        if problems and too_long:
            return error_response(TOO_LARGE, message, TOO_LARGE_CODE, param=params[0])
        return error_response(400, message, "invalid_request_error", param=params[0] if params else None)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if not request.url.path.startswith(API_PREFIX + "/"):
            return await http_exception_handler(request, exc)
        message = str(exc.detail)
        if isinstance(exc.__cause__, UnicodeDecodeError):
            cause = exc.__cause__
            message = f"the request body is not valid UTF-8 ({cause.reason} at byte {cause.start}); send JSON in UTF-8"
        elif exc.status_code == 400:
            message = f"the request body could not be read as JSON: {message}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request_error")
        return error_response(exc.status_code, message, code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        # A bug, not the client's mistake; the traceback goes to the log (the
        # exception is raised on after this answer), never to the client.
        if not request.url.path.startswith(API_PREFIX + "/"):
            return PlainTextResponse("Internal Server Error", status_code=500)
        return error_response(500, "the server failed to answer this request (the error is in its log)",
                              "internal_error")


def add_api_not_found(app: FastAPI) -> None:
    """A route under /v1 that does not exist is an OpenAI-shaped 404 (405 for
    a known path with another method), not the chat page's HTML answer.
    Added after every /v1 router, since it matches any path under /v1."""
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE"]

    def allowed(request: Request) -> list[str]:
        found = []
        for method in methods:
            scope = {"type": "http", "method": method, "path": request.url.path,
                     "root_path": request.scope.get("root_path", ""), "headers": []}
            if any(route is not catch_all and not isinstance(route, Mount)  # the pages' mounts take any path
                   and route.matches(scope)[0] == Match.FULL for route in app.router.routes):
                found.append(method)
        return found

    def not_found(request: Request):
        if others := allowed(request):
            return error_response(405, f"{request.method} {request.url.path} is not a route; use "
                                       f"{' or '.join(others)}", "method_not_allowed",
                                  headers={"Allow": ", ".join(others)})
        return error_response(404, f"no route {request.method} {request.url.path}", "not_found")

    app.add_api_route(f"{API_PREFIX}/{{path:path}}", not_found, include_in_schema=False, methods=methods)
    catch_all = app.router.routes[-1]


def document_errors(app: FastAPI) -> None:
    """Make the OpenAPI schema say what the server sends: a validation error is
    a 400 with `ErrorResponse` (FastAPI's default 422 is dropped), and a route
    that takes a body may answer 413 for a request over a size limit."""
    from fastapi.openapi.utils import get_openapi
    from pydantic.json_schema import models_json_schema

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        _, defined = models_json_schema([(ErrorResponse, "serialization")],
                                        ref_template="#/components/schemas/{model}")
        components.update(defined["$defs"])
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if responses.pop("422", None) is not None or "requestBody" in operation:
                    responses.setdefault("400", {"description": "Bad input", **ref})
                if "requestBody" in operation:
                    responses.setdefault(str(TOO_LARGE), {"description": "Over a size limit", **ref})
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
