from __future__ import annotations

import datetime as dt
from typing import Literal

from pydantic import EmailStr, Field

from services.core.schemas import RequestModel, ResponseModel

Password = Field(min_length=1, max_length=1024, description="At least VECTA_PASSWORD_MIN_LENGTH characters")


class UserOut(ResponseModel):
    id: str
    email: str
    name: str
    email_verified: bool
    created_at: dt.datetime


class LoginIn(RequestModel):
    email: EmailStr
    password: str = Field(min_length=1, max_length=1024)


class TokenPair(ResponseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"
    expires_in: int


class RefreshIn(RequestModel):
    refresh_token: str = Field(min_length=1, max_length=4096)  # any token-shaped string gets a 401


class MembershipOut(ResponseModel):
    org_id: str
    role: str


class ApiKeyIdentity(ResponseModel):
    id: str
    org_id: str
    name: str


class MeOut(ResponseModel):
    user: UserOut | None = Field(description="The console user; null when the caller is an API key")
    api_key: ApiKeyIdentity | None = Field(None, description="The API key, when the caller is one")
    memberships: list[MembershipOut]


class TokenIn(RequestModel):
    token: str = Field(min_length=1, max_length=200)


class EmailIn(RequestModel):
    email: EmailStr


class PasswordResetIn(RequestModel):
    token: str = Field(min_length=1, max_length=200)
    new_password: str = Password


class PasswordChangeIn(RequestModel):
    current_password: str = Field(min_length=1, max_length=1024)
    new_password: str = Password


class Accepted(ResponseModel):
    status: Literal["accepted"] = "accepted"
    detail: str
