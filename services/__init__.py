"""The four mmserve services, each deployable on its own: decoder, encoder, llm, router."""
