// A real OpenID Connect provider for the integration tests: oidc-provider (a
// certified implementation) on 127.0.0.1, with its development login form (any
// user name, any password). Every event the tests count is a JSON line on stdout.
//
// Environment:
//   IDP_PORT       port to listen on (required)
//   RP_REDIRECTS   comma-separated redirect URIs of the client
//   POST_LOGOUT    comma-separated post-logout redirect URIs
//   AUTH_METHOD    client_secret_basic (default) | client_secret_post
//   AT_TTL, RT_TTL access and refresh token lifetimes in seconds (300, 86400)
//   ROTATE         1: a refresh token is single use and replaced at each refresh
import Provider from 'oidc-provider';

const env = process.env;
const PORT = Number(env.IDP_PORT);
if (!PORT) {
  console.error('IDP_PORT is required');
  process.exit(2);
}
const ISSUER = `http://127.0.0.1:${PORT}`;
const AT_TTL = Number(env.AT_TTL || 300);
const RT_TTL = Number(env.RT_TTL || 86400);
const API = 'https://api.test';
const list = (v) => (v || '').split(',').filter(Boolean);
const log = (event) => process.stdout.write(`${JSON.stringify(event)}\n`);

const client = (clientId, grantTypes) => ({
  client_id: clientId,
  client_secret: env.CLIENT_SECRET || 'test-secret-test-secret-test-secret',
  redirect_uris: list(env.RP_REDIRECTS),
  post_logout_redirect_uris: list(env.POST_LOGOUT),
  grant_types: grantTypes,
  response_types: ['code'],
  token_endpoint_auth_method: env.AUTH_METHOD || 'client_secret_basic',
});

const provider = new Provider(ISSUER, {
  clients: [
    client('portcullis', ['authorization_code', 'refresh_token']),
    client('norefresh', ['authorization_code']),
  ],
  pkce: { required: () => true },
  scopes: ['openid', 'offline_access', 'profile', 'email'],
  claims: {
    openid: ['sub'],
    profile: ['name', 'picture'],
    email: ['email', 'email_verified'],
  },
  findAccount: (ctx, id) => ({
    accountId: id,
    claims: () => ({
      sub: id,
      name: `User ${id}`,
      email: `${id}@example.test`,
      // Users whose name starts with "unverified" have an address nobody checked.
      email_verified: !id.startsWith('unverified'),
      picture: `https://img.example.test/${id}.png`,
    }),
  }),
  features: {
    devInteractions: { enabled: true },
    revocation: { enabled: true },
    rpInitiatedLogout: { enabled: true },
    // JWT access tokens for the API audience, so bearer clients can be verified
    // against the JWKS.
    resourceIndicators: {
      enabled: true,
      defaultResource: () => API,
      useGrantedResource: () => true,
      getResourceServerInfo: () => ({
        scope: 'api',
        audience: API,
        accessTokenFormat: 'jwt',
        accessTokenTTL: AT_TTL,
      }),
    },
  },
  // Refresh tokens for every client allowed the grant (without prompt=consent).
  issueRefreshToken: (ctx, c) => c.grantTypeAllowed('refresh_token'),
  rotateRefreshToken: env.ROTATE === '1',
  ttl: {
    AccessToken: AT_TTL,
    RefreshToken: RT_TTL,
    IdToken: 3600,
    AuthorizationCode: 60,
    Interaction: 600,
    Session: 86400,
    Grant: 86400,
  },
  // First-party client: consent is implied, only the login form remains.
  async loadExistingGrant(ctx) {
    const grantId =
      ctx.oidc.result?.consent?.grantId ||
      ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
    if (grantId) {
      const existing = await ctx.oidc.provider.Grant.find(grantId);
      if (existing) return existing;
    }
    const grant = new ctx.oidc.provider.Grant({
      clientId: ctx.oidc.client.clientId,
      accountId: ctx.oidc.session.accountId,
    });
    grant.addOIDCScope('openid profile email offline_access');
    grant.addResourceScope(API, 'api');
    await grant.save();
    return grant;
  },
});
provider.proxy = false;

provider.use(async (ctx, next) => {
  log({ event: 'request', method: ctx.method, path: ctx.path });
  await next();
});
provider.on('grant.success', (ctx) => {
  log({ event: 'grant.success', grant_type: ctx.oidc.params.grant_type });
});
provider.on('grant.error', (ctx, err) => {
  log({ event: 'grant.error', grant_type: ctx.oidc.params?.grant_type, error: err.error });
});
provider.on('grant.revoked', () => log({ event: 'grant.revoked' }));
provider.on('end_session.success', () => log({ event: 'end_session.success' }));

provider.listen(PORT, '127.0.0.1', () => log({ event: 'listening', port: PORT, issuer: ISSUER }));
