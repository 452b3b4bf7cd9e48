"""`sluice admin projects ...` and `sluice admin keys ...`: the admin API from the command line.

A gRPC client of AdminService, like `sluice batches|files` (service/runtime/client_cli.py: same
address, output and exit statuses), but sending `SLUICE_ADMIN_KEY` instead of a project's key.
A new key's value is printed once, on stdout; nothing here stores it.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from service.runtime import client_cli
from service.runtime.client_cli import Api, CliError, Out, _table, _when, as_json
from service.runtime.config import ClientSettings
from sluice.v1 import admin_pb2, admin_pb2_grpc

ADMIN_HELP = """environment:
  SLUICE_ADDRESS     the server's gRPC address: host:port (127.0.0.1:50051) or https://host[:port]
  SLUICE_ADMIN_KEY   the admin key the server was started with (sent as `authorization: Bearer ...`)
exit status: 0 on success; 1 when a call fails (its message goes to stderr); 2 on a usage error."""


class AdminApi:
    def __init__(self, api: Api) -> None:
        self.api = api
        self.stub = admin_pb2_grpc.AdminServiceStub(api.channel)

    def call(self, method: str, request: Any) -> Any:
        return self.api.call(getattr(self.stub, method), request)


def _budget(project: Any) -> str:
    return f"${project.monthly_budget_usd:g}/month" if project.HasField("monthly_budget_usd") else ""


def _projects(out: Out, projects: list[Any], has_more: bool = False) -> None:
    table = _table("ID", "NAME", "STATUS", "SOURCE", "BUDGET", "CREATED")
    for p in projects:
        table.add_row(p.id, p.name, p.status, p.source, _budget(p), _when(p.created_at, short=True))
    out.table(table)
    if has_more and projects:
        out.say(f"more: --after {projects[-1].id}")


def _keys(out: Out, keys: list[Any], has_more: bool = False) -> None:
    table = _table("ID", "NAME", "KEY", "SOURCE", "CREATED", "LAST USED")
    for k in keys:
        table.add_row(k.id, k.name, k.redacted_value, k.source, _when(k.created_at, short=True),
                      _when(k.last_used_at, short=True) if k.HasField("last_used_at") else "never")
    out.table(table)
    if has_more and keys:
        out.say(f"more: --after {keys[-1].id}")


def _show(out: Out, message: Any, render: Any) -> int:
    if out.json:
        out.emit(as_json(message))
    else:
        render(out, [message])
    return 0


def cmd_projects_list(admin: AdminApi, out: Out, args: argparse.Namespace) -> int:
    request = admin_pb2.ListProjectsRequest(after=args.after or "", include_archived=args.all)
    if args.limit is not None:
        request.limit = args.limit
    page = admin.call("ListProjects", request)
    if out.json:
        out.emit(as_json(page))
    else:
        _projects(out, list(page.data), page.has_more)
    return 0


def cmd_projects_create(admin: AdminApi, out: Out, args: argparse.Namespace) -> int:
    return _show(out, admin.call("CreateProject", admin_pb2.CreateProjectRequest(name=args.name)), _projects)


def cmd_projects_archive(admin: AdminApi, out: Out, args: argparse.Namespace) -> int:
    project = admin.call("ArchiveProject", admin_pb2.ArchiveProjectRequest(project_id=args.project_id))
    return _show(out, project, _projects)


def cmd_projects_budget(admin: AdminApi, out: Out, args: argparse.Namespace) -> int:
    request = admin_pb2.SetProjectBudgetRequest(project_id=args.project_id)
    if args.usd.lower() != "none":
        try:
            request.monthly_budget_usd = float(args.usd)
        except ValueError:
            raise CliError(f"the budget is a number of US dollars a month, or `none`; got {args.usd!r}") from None
    return _show(out, admin.call("SetProjectBudget", request), _projects)


def cmd_keys_list(admin: AdminApi, out: Out, args: argparse.Namespace) -> int:
    request = admin_pb2.ListProjectApiKeysRequest(project_id=args.project_id, after=args.after or "")
    if args.limit is not None:
        request.limit = args.limit
    page = admin.call("ListProjectApiKeys", request)
    if out.json:
        out.emit(as_json(page))
    else:
        _keys(out, list(page.data), page.has_more)
    return 0


def cmd_keys_create(admin: AdminApi, out: Out, args: argparse.Namespace) -> int:
    key = admin.call("CreateProjectApiKey", admin_pb2.CreateProjectApiKeyRequest(project_id=args.project_id,
                                                                                 name=args.name))
    if out.json:
        out.emit(as_json(key))
        return 0
    out.say(f"created key {key.id} ({key.name}) for project {key.project_id}; its value, shown only this once:")
    print(key.value, flush=True)
    return 0


def cmd_keys_revoke(admin: AdminApi, out: Out, args: argparse.Namespace) -> int:
    gone = admin.call("DeleteProjectApiKey", admin_pb2.DeleteProjectApiKeyRequest(project_id=args.project_id,
                                                                                  key_id=args.key_id))
    if out.json:
        out.emit(as_json(gone))
    else:
        out.stdout.print(f"revoked {gone.id}")
    return 0


def add_commands(sub: Any) -> None:
    """Add `admin` to the `sluice` command's subparsers."""
    fmt = argparse.RawDescriptionHelpFormatter
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print the API's JSON instead of tables")

    admin = sub.add_parser("admin", help="manage projects and their API keys (needs SLUICE_ADMIN_KEY)",
                           epilog=ADMIN_HELP, formatter_class=fmt)
    asub = admin.add_subparsers(dest="area", required=True)

    projects = asub.add_parser("projects", help="list, create and archive projects; set budgets",
                               epilog=ADMIN_HELP, formatter_class=fmt)
    psub = projects.add_subparsers(dest="action", required=True)
    plist = psub.add_parser("list", parents=[common], help="list projects, oldest first", epilog=ADMIN_HELP,
                            formatter_class=fmt)
    plist.add_argument("--all", action="store_true", help="archived projects too")
    plist.add_argument("--limit", type=int, help="1-100 (20)")
    plist.add_argument("--after", metavar="PROJECT_ID", help="the last id of the previous page")
    plist.set_defaults(handler=cmd_projects_list)
    create = psub.add_parser("create", parents=[common], help="create a project", epilog=ADMIN_HELP,
                             formatter_class=fmt)
    create.add_argument("name", metavar="NAME")
    create.set_defaults(handler=cmd_projects_create)
    archive = psub.add_parser("archive", parents=[common], epilog=ADMIN_HELP, formatter_class=fmt,
                              help="archive a project: all its keys stop working (cannot be undone)")
    archive.add_argument("project_id", metavar="PROJECT_ID")
    archive.set_defaults(handler=cmd_projects_archive)
    budget = psub.add_parser("budget", parents=[common], epilog=ADMIN_HELP, formatter_class=fmt,
                             help="set a project's budget in USD per calendar month (`none` clears it)")
    budget.add_argument("project_id", metavar="PROJECT_ID")
    budget.add_argument("usd", metavar="USD")
    budget.set_defaults(handler=cmd_projects_budget)

    keys = asub.add_parser("keys", help="list, create and revoke a project's API keys", epilog=ADMIN_HELP,
                           formatter_class=fmt)
    ksub = keys.add_subparsers(dest="action", required=True)
    klist = ksub.add_parser("list", parents=[common], help="list a project's keys (redacted)", epilog=ADMIN_HELP,
                            formatter_class=fmt)
    klist.add_argument("project_id", metavar="PROJECT_ID")
    klist.add_argument("--limit", type=int, help="1-100 (20)")
    klist.add_argument("--after", metavar="KEY_ID", help="the last id of the previous page")
    klist.set_defaults(handler=cmd_keys_list)
    kcreate = ksub.add_parser("create", parents=[common], epilog=ADMIN_HELP, formatter_class=fmt,
                              help="create a key; its value is printed once, on stdout")
    kcreate.add_argument("project_id", metavar="PROJECT_ID")
    kcreate.add_argument("--name", required=True, help="a label to tell keys apart")
    kcreate.set_defaults(handler=cmd_keys_create)
    revoke = ksub.add_parser("revoke", parents=[common], epilog=ADMIN_HELP, formatter_class=fmt,
                             help="revoke a key created through the admin API")
    revoke.add_argument("project_id", metavar="PROJECT_ID")
    revoke.add_argument("key_id", metavar="KEY_ID")
    revoke.set_defaults(handler=cmd_keys_revoke)


def run(args: argparse.Namespace) -> int:
    admin_key = os.environ.get("SLUICE_ADMIN_KEY", "").strip()
    if not admin_key:
        Out(False).say("sluice: no admin key: set SLUICE_ADMIN_KEY")
        return 2
    return client_cli.run(args, ClientSettings(address=ClientSettings.from_env().address, api_key=admin_key),
                          AdminApi)
