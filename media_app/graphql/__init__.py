"""The GraphQL face of the media API: the same upload services and status groups as REST.

``/graphql/`` over HTTP (queries and mutations, GraphiQL when DEBUG) and over a websocket
speaking ``graphql-transport-ws`` (the ``mediaStatus`` subscription, and queries too). Nothing
here decides anything the REST API does not: resolvers authenticate like REST, look items up
through the same ownership rule, call the services in ``media_app.uploads`` and translate
their refusals into GraphQL errors carrying the REST error code in ``extensions.code``.
"""
