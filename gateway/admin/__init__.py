"""The admin console at `/admin`: HTML pages for people, a JSON API under `/admin/api/` for scripts.

Both read and change the gateway through the same parts the request path uses (the store, the policy);
`gateway.api.app.create_app` mounts them. docs/admin.md says what each page shows and why it is built as
server-rendered pages.
"""
