/*
 * GraphiQL at /graphql/: queries and mutations over HTTP with the session (and its CSRF token),
 * subscriptions over graphql-transport-ws on the same path. React, ReactDOM and GraphiQL are
 * vendored (vendor/<name>-<version>/), never loaded from a CDN.
 */
(() => {
  "use strict";

  const EXAMPLE = `# GraphiQL for cpc-media. Ctrl-Enter runs the query; the Docs button lists the schema.
# Upload with createMediaUpload, then watch an item with the mediaStatus subscription.
{
  mediaItems(first: 10) {
    totalCount
    edges {
      node { id fileName kind processingStatus progress error { code message } }
    }
  }
}
`;
  const csrfToken = document.querySelector('meta[name="csrf-token"]').content;
  const url = `${location.origin}${location.pathname}`;
  const fetcher = GraphiQL.createFetcher({
    url,
    headers: { "X-CSRFToken": csrfToken },
    subscriptionUrl: url.replace(/^http/, "ws"),
  });
  const root = ReactDOM.createRoot(document.getElementById("graphiql"));
  root.render(React.createElement(GraphiQL, {
    fetcher,
    defaultQuery: EXAMPLE,
    defaultEditorToolsVisibility: true,
    isHeadersEditorEnabled: true,
  }));
  document.documentElement.dataset.ready = "true";
})();
