"""One APIRouter per resource; `gateway.api.app` includes them in the order the schema lists them."""
