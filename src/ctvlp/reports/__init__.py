"""The reports stage: each report split into per-anatomy text with a status and catalog findings
(``schema``), by the offline ``rules`` parser or an LLM behind an OpenAI-compatible server
(``llm``); ``stage.write_reports`` runs the configured backend."""
