"""Who is asking: a request's Bearer API key (or, for people, a session) as a Principal."""
