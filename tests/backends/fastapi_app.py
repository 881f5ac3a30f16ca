"""An inventory API written the way FastAPI's tutorial writes one, for cachegate's tests.

Routers with prefixes and `@router.get("/")`, so collections end in a slash (`/items/`) and
FastAPI redirects the other spelling; integer path parameters; OAuth2 bearer tokens with scopes
(HS256, the tutorial's PyJWT); 422s from validation; ETags on items. Nothing here knows about
the gateway. `GET /__stats` (left out of the OpenAPI document) counts the requests that reached
the app, so tests can tell what the gateway answered itself.

Run: python -m fastapi_app --port 8000
"""

import argparse
import hashlib
import os
import time
from typing import Annotated

import jwt
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request, Response, Security
from fastapi.security import OAuth2PasswordBearer, SecurityScopes
from pydantic import BaseModel

SECRET = os.environ.get("JWT_SECRET", "dev-only-secret")

app = FastAPI(title="Inventory", version="1.0.0")
oauth2_scheme = OAuth2PasswordBearer(
    tokenUrl="token",
    scopes={"orders:read": "Read your orders", "orders:write": "Place orders"},
)

STATS = {"requests": 0}


@app.middleware("http")
async def count_requests(request: Request, call_next):
    if request.url.path != "/__stats":
        STATS["requests"] += 1
    return await call_next(request)


@app.get("/__stats", include_in_schema=False)
def stats():
    return STATS


class ItemIn(BaseModel):
    name: str
    stock: int = 0


class ItemPatch(BaseModel):
    name: str | None = None
    stock: int | None = None


class Item(ItemIn):
    id: int
    version: int


ITEMS: dict[int, Item] = {
    1: Item(id=1, name="kettle", stock=4, version=1),
    2: Item(id=2, name="teapot", stock=9, version=1),
}

items = APIRouter(prefix="/items", tags=["items"])


def etag_of(item: Item) -> str:
    digest = hashlib.sha256(item.model_dump_json().encode()).hexdigest()[:16]
    return f'"{digest}"'


@items.get("/")
def list_items() -> list[Item]:
    return list(ITEMS.values())


@items.post("/", status_code=201)
def create_item(item: ItemIn) -> Item:
    new = Item(id=max(ITEMS, default=0) + 1, version=1, **item.model_dump())
    ITEMS[new.id] = new
    return new


@items.get("/{item_id}")
def read_item(item_id: int, request: Request, response: Response):
    item = ITEMS.get(item_id)
    if item is None:
        raise HTTPException(status_code=404, detail="Item not found")
    etag = etag_of(item)
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers={"ETag": etag})
    response.headers["ETag"] = etag
    return item


@items.patch("/{item_id}")
def update_item(item_id: int, patch: ItemPatch) -> Item:
    item = ITEMS.get(item_id)
    if item is None:
        raise HTTPException(status_code=404, detail="Item not found")
    changes = patch.model_dump(exclude_unset=True)
    updated = item.model_copy(update={**changes, "version": item.version + 1})
    ITEMS[item_id] = updated
    return updated


@items.delete("/{item_id}", status_code=204)
def delete_item(item_id: int):
    if ITEMS.pop(item_id, None) is None:
        raise HTTPException(status_code=404, detail="Item not found")


class Order(BaseModel):
    id: int
    user_id: int
    item_id: int


ORDERS: dict[int, list[Order]] = {1: [Order(id=1, user_id=1, item_id=2)]}


def current_user(
    security_scopes: SecurityScopes, token: Annotated[str, Depends(oauth2_scheme)]
) -> int:
    unauthorized = HTTPException(
        status_code=401,
        detail="Could not validate credentials",
        headers={"WWW-Authenticate": f'Bearer scope="{security_scopes.scope_str}"'},
    )
    try:
        claims = jwt.decode(token, SECRET, algorithms=["HS256"])
        user_id = int(claims["sub"])
    except (jwt.InvalidTokenError, KeyError, ValueError):
        raise unauthorized
    granted = claims.get("scope", "").split()
    if any(scope not in granted for scope in security_scopes.scopes):
        raise HTTPException(status_code=403, detail="Not enough permissions")
    return user_id


users = APIRouter(prefix="/users", tags=["orders"])


@users.get("/{user_id}/orders/")
def list_orders(
    user_id: int, me: Annotated[int, Security(current_user, scopes=["orders:read"])]
) -> list[Order]:
    if me != user_id:
        raise HTTPException(status_code=403, detail="Not your orders")
    return ORDERS.get(user_id, [])


class OrderIn(BaseModel):
    item_id: int


@users.post("/{user_id}/orders/", status_code=201)
def place_order(
    user_id: int,
    order: OrderIn,
    me: Annotated[int, Security(current_user, scopes=["orders:write"])],
) -> Order:
    if me != user_id:
        raise HTTPException(status_code=403, detail="Not your orders")
    placed = ORDERS.setdefault(user_id, [])
    new = Order(id=sum(len(o) for o in ORDERS.values()) + 1, user_id=user_id, item_id=order.item_id)
    placed.append(new)
    return new


class Login(BaseModel):
    username: str
    password: str


@app.post("/token")
def login(login: Login):
    if login.password != "secret":
        raise HTTPException(status_code=400, detail="Incorrect username or password")
    user_id = 1 if login.username == "alice" else 2
    claims = {
        "sub": str(user_id),
        "scope": "orders:read orders:write",
        "exp": int(time.time()) + 3600,
    }
    return {"access_token": jwt.encode(claims, SECRET, algorithm="HS256"), "token_type": "bearer"}


app.include_router(items)
app.include_router(users)

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    # uvicorn's defaults otherwise, keep-alive (5 s) included.
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
