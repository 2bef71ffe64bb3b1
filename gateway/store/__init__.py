"""Everything the gateway keeps in its database, behind the request path (write-behind, sync)."""
