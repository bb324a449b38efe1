//! Sync outbox API (admins): list jobs by status, retry a failed job.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde_json::{Value, json};

use super::{ApiError, Page, Resp, id_segment, identity, json_response, query};
use crate::event::iso;
use crate::node::app::App;
use crate::store::{self, SyncJob};

fn job_json(j: &SyncJob) -> Value {
    json!({
        "id": j.id,
        "entity": j.entity,
        "entity_id": j.entity_id,
        "action": j.action,
        "status": j.status,
        "attempts": j.attempts,
        "next_attempt_at": iso(&j.next_attempt_at),
        "last_error": j.last_error,
        "created_at": iso(&j.created_at),
        "updated_at": iso(&j.updated_at),
        "delivered_at": j.delivered_at.as_ref().map(iso),
    })
}

fn admin<B>(app: &App, req: &Request<B>) -> Result<(), ApiError> {
    if identity(app, req)?.role.is_staff() {
        Ok(())
    } else {
        Err(ApiError::Forbidden("admins only".into()))
    }
}

pub async fn list(app: &Arc<App>, req: Request<Incoming>) -> Result<Resp, ApiError> {
    admin(app, &req)?;
    let q = query(&req);
    let page = Page::from_query(&q)?;
    let status = q.get("status").map(String::as_str);
    if let Some(s) = status
        && !["pending", "delivering", "delivered", "failed"].contains(&s)
    {
        return Err(ApiError::BadRequest(
            "status must be pending, delivering, delivered or failed".into(),
        ));
    }
    let jobs = store::list_sync_jobs(&app.ctx.db, status, page.cursor, page.limit).await?;
    Ok(json_response(
        StatusCode::OK,
        &page.list(&jobs, |j| j.id, job_json),
    ))
}

pub async fn retry(app: &Arc<App>, req: Request<Incoming>, id: &str) -> Result<Resp, ApiError> {
    admin(app, &req)?;
    let id = id_segment(id)?;
    match store::retry_sync_job(&app.ctx.db, id).await? {
        Some(job) => Ok(json_response(StatusCode::OK, &job_json(&job))),
        None => match store::get_sync_job(&app.ctx.db, id).await? {
            None => Err(ApiError::NotFound(format!("sync job {id} not found"))),
            Some(j) => Err(ApiError::Conflict(format!(
                "sync job {id} is {}; only failed jobs are retried",
                j.status
            ))),
        },
    }
}
