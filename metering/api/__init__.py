"""The HTTP API of contract section 5 (`metering serve`)."""
