// Swagger UI over the gateway's own document. validatorUrl: null keeps it from sending the
// document to validator.swagger.io (the default), so the page makes no request off the host.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  validatorUrl: null,
  deepLinking: true,
  persistAuthorization: false,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
