"""The HTTP face of the gateway: OpenAI's API translated to pipeline calls and back."""
