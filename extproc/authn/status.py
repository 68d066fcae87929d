"""Verification outcomes, with the exact messages Envoy's jwt_authn filter puts in its 401/403 body.

Users compare extproc's responses with Envoy's own filter, so the codes and strings are the
public behaviour of jwt_verify_lib (google/jwt_verify_lib `status.cc`), which Envoy sends as
the local-reply body.
"""

from __future__ import annotations

from enum import Enum


class Status(Enum):
    OK = "OK"
    JWT_MISSED = "Jwt is missing"
    JWT_NOT_YET_VALID = "Jwt not yet valid"
    JWT_EXPIRED = "Jwt is expired"
    JWT_BAD_FORMAT = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
    JWT_HEADER_BAD_BASE64 = "Jwt header is an invalid Base64url encoded"
    JWT_HEADER_BAD_JSON = "Jwt header is an invalid JSON"
    JWT_HEADER_BAD_ALG = "Jwt header [alg] field is required and must be a string"
    JWT_HEADER_NOT_IMPLEMENTED_ALG = "Jwt header [alg] is not supported"
    JWT_HEADER_BAD_KID = "Jwt header [kid] field is not a string"
    JWT_PAYLOAD_BAD_BASE64 = "Jwt payload is an invalid Base64url encoded"
    JWT_ED25519_SIGNATURE_WRONG_LENGTH = "Jwt ED25519 signature is wrong length"
    JWT_PAYLOAD_BAD_JSON = "Jwt payload is an invalid JSON"
    JWT_ISS_NOT_STRING = "Jwt payload [iss] field is not a string"
    JWT_SUB_NOT_STRING = "Jwt payload [sub] field is not a string"
    JWT_IAT_NOT_INTEGER = "Jwt payload [iat] field is not an integer"
    JWT_IAT_OUT_OF_RANGE = "Jwt payload [iat] field is not a positive 64 bit integer"
    JWT_NBF_NOT_INTEGER = "Jwt payload [nbf] field is not an integer"
    JWT_NBF_OUT_OF_RANGE = "Jwt payload [nbf] field is not a positive 64 bit integer"
    JWT_EXP_NOT_INTEGER = "Jwt payload [exp] field is not an integer"
    JWT_EXP_OUT_OF_RANGE = "Jwt payload [exp] field is not a positive 64 bit integer"
    JWT_JTI_NOT_STRING = "Jwt payload [jti] field is not a string"
    JWT_AUD_NOT_STRING = "Jwt payload [aud] field is not a string or string list"
    JWT_SIGNATURE_BAD_BASE64 = "Jwt signature is an invalid Base64url encoded"
    JWT_UNKNOWN_ISSUER = "Jwt issuer is not configured"
    JWT_AUDIENCE_NOT_ALLOWED = "Audiences in Jwt are not allowed"
    JWT_VERIFICATION_FAIL = "Jwt verification fails"
    JWKS_KID_ALG_MISMATCH = "Jwks doesn't have key to match kid or alg from Jwt"
    JWKS_NO_VALID_KEYS = "Jwks doesn't have any valid public key"
    JWKS_FETCH_FAIL = "Jwks remote fetch is failed"

    @property
    def message(self) -> str:
        return self.value

    @property
    def http_code(self) -> int:
        """Envoy maps only an audience mismatch to 403; every other failure is 401."""
        if self is Status.OK:
            return 200
        return 403 if self is Status.JWT_AUDIENCE_NOT_ALLOWED else 401

    @property
    def metric_name(self) -> str:
        return self.name.lower()


class JwksError(ValueError):
    """A JWKS document that yields no usable key; the message is jwt_verify_lib's wording."""
