from tests.gateway.pipeline.fakes import new_entries as new_entries
