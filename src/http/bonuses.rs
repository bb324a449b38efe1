//! `GET /api/bonuses/me`: the caller's balance and operations, paged.

use std::sync::Arc;

use hyper::Request;
use hyper::StatusCode;
use hyper::body::Incoming;
use serde_json::json;

use super::{ApiError, Page, Resp, identity, json_response, query};
use crate::event::{iso, money};
use crate::node::app::App;
use crate::store;

pub async fn me(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    let who = identity(app, &req)?;
    let page = Page::from_query(&query(&req))?;
    let balance = store::bonus_balance(&app.ctx.db, who.user_id).await?;
    let ops = store::bonus_operations(&app.ctx.db, who.user_id, page.cursor, page.limit).await?;
    let mut body = page.list(
        &ops,
        |o| o.id,
        |o| {
            json!({
                "id": o.id,
                "type": o.kind,
                "amount": money(o.amount_cents),
                "order_id": o.order_id,
                "balance_after": money(o.balance_after_cents),
                "created_at": iso(&o.created_at),
            })
        },
    );
    body["balance"] = money(balance);
    Ok(json_response(StatusCode::OK, &body))
}
