//! Projects, their default resource space, and the access keys that sign API calls.

use rusqlite::{OptionalExtension, params};

use crate::{Store, StoreError};

/// A project (tenant) with its default resource space (`app`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Project {
    pub project_id: String,
    pub name: String,
    pub default_app_id: String,
    pub default_app_name: String,
    pub created_at: i64,
}

/// An AK/SK pair bound to a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessKey {
    pub access_key: String,
    pub secret_key: String,
    pub project_id: String,
}

impl Store {
    /// Creates a project, its default resource space and its first access key, atomically.
    pub async fn create_project(&self, project: Project, key: AccessKey) -> Result<(), StoreError> {
        self.write(move |c| {
            c.execute(
                "INSERT INTO projects (project_id, name, created_at) VALUES (?1, ?2, ?3)",
                params![project.project_id, project.name, project.created_at],
            )?;
            c.execute(
                "INSERT INTO apps (app_id, project_id, app_name, is_default, created_at) VALUES (?1, ?2, ?3, 1, ?4)",
                params![project.default_app_id, project.project_id, project.default_app_name, project.created_at],
            )?;
            c.execute(
                "INSERT INTO access_keys (access_key, secret_key, project_id, created_at) VALUES (?1, ?2, ?3, ?4)",
                params![key.access_key, key.secret_key, key.project_id, project.created_at],
            )?;
            Ok(())
        })
        .await
    }

    /// Every project, oldest first.
    pub async fn projects(&self) -> Result<Vec<Project>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare(
                "SELECT p.project_id, p.name, a.app_id, a.app_name, p.created_at FROM projects p \
                 JOIN apps a ON a.project_id = p.project_id AND a.is_default = 1 ORDER BY p.created_at",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok(Project {
                    project_id: r.get(0)?,
                    name: r.get(1)?,
                    default_app_id: r.get(2)?,
                    default_app_name: r.get(3)?,
                    created_at: r.get(4)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// Every access key.
    pub async fn access_keys(&self) -> Result<Vec<AccessKey>, StoreError> {
        self.read(|c| {
            let mut stmt =
                c.prepare("SELECT access_key, secret_key, project_id FROM access_keys")?;
            let rows = stmt.query_map([], |r| {
                Ok(AccessKey {
                    access_key: r.get(0)?,
                    secret_key: r.get(1)?,
                    project_id: r.get(2)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }

    /// The name of a resource space, if it exists.
    pub async fn app_name(&self, app_id: String) -> Result<Option<String>, StoreError> {
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT app_name FROM apps WHERE app_id = ?1",
                [app_id],
                |r| r.get(0),
            )
            .optional()?)
        })
        .await
    }
}
