//! Product storage in SQLite: the example's real database.
//!
//! A single connection behind a mutex is plenty for a demo backend; callers run
//! these blocking methods on tokio's blocking pool.

use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

/// One product as stored and as served.
#[derive(Debug, Clone, Serialize)]
pub struct Product {
    pub id: i64,
    pub name: String,
    pub description: String,
    pub price: f64,
    pub stock: i64,
    /// Incremented by every write; lets clients (and tests) tell representations apart.
    pub version: i64,
}

/// Every field of a product except the ones the database assigns.
#[derive(Debug, Clone, Default)]
pub struct ProductFields {
    pub name: Option<String>,
    pub description: Option<String>,
    pub price: Option<f64>,
    pub stock: Option<i64>,
}

pub struct Db {
    conn: Mutex<Connection>,
}

const COLUMNS: &str = "id, name, description, price, stock, version";

fn row_to_product(row: &rusqlite::Row<'_>) -> rusqlite::Result<Product> {
    Ok(Product {
        id: row.get(0)?,
        name: row.get(1)?,
        description: row.get(2)?,
        price: row.get(3)?,
        stock: row.get(4)?,
        version: row.get(5)?,
    })
}

impl Db {
    /// Opens the database at `path`, or an in-memory one, and creates the schema.
    pub fn open(path: Option<&str>) -> rusqlite::Result<Self> {
        let conn = match path {
            Some(p) => Connection::open(p)?,
            None => Connection::open_in_memory()?,
        };
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             CREATE TABLE IF NOT EXISTS products (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 name TEXT NOT NULL,
                 description TEXT NOT NULL,
                 price REAL NOT NULL,
                 stock INTEGER NOT NULL,
                 version INTEGER NOT NULL DEFAULT 1
             );",
        )?;
        Ok(Db {
            conn: Mutex::new(conn),
        })
    }

    /// Inserts `count` generated products in one transaction, unless the table already holds rows.
    pub fn seed(&self, count: u64) -> rusqlite::Result<u64> {
        let mut conn = self.conn.lock().expect("db mutex poisoned");
        let existing: i64 = conn.query_row("SELECT COUNT(*) FROM products", [], |r| r.get(0))?;
        if existing > 0 {
            return Ok(existing as u64);
        }
        let tx = conn.transaction()?;
        {
            let mut insert = tx.prepare(
                "INSERT INTO products (name, description, price, stock) VALUES (?1, ?2, ?3, ?4)",
            )?;
            for i in 1..=count {
                insert.execute(params![
                    format!("Product {i}"),
                    format!("Seeded product number {i}"),
                    ((i * 137) % 10_000) as f64 / 100.0 + 1.0,
                    (i * 7 % 500) as i64,
                ])?;
            }
        }
        tx.commit()?;
        Ok(count)
    }

    pub fn list(&self, page: u64, per_page: u64) -> rusqlite::Result<(Vec<Product>, u64)> {
        let conn = self.conn.lock().expect("db mutex poisoned");
        let total: i64 = conn.query_row("SELECT COUNT(*) FROM products", [], |r| r.get(0))?;
        let offset = (page - 1).saturating_mul(per_page);
        let mut stmt = conn.prepare_cached(&format!(
            "SELECT {COLUMNS} FROM products ORDER BY id LIMIT ?1 OFFSET ?2"
        ))?;
        let items = stmt
            .query_map(params![per_page as i64, offset as i64], row_to_product)?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok((items, total as u64))
    }

    pub fn get(&self, id: i64) -> rusqlite::Result<Option<Product>> {
        let conn = self.conn.lock().expect("db mutex poisoned");
        conn.query_row(
            &format!("SELECT {COLUMNS} FROM products WHERE id = ?1"),
            params![id],
            row_to_product,
        )
        .optional()
    }

    /// Inserts a product; `fields` must be complete (validated by the caller).
    pub fn create(&self, fields: &ProductFields) -> rusqlite::Result<Product> {
        let conn = self.conn.lock().expect("db mutex poisoned");
        conn.query_row(
            &format!(
                "INSERT INTO products (name, description, price, stock) VALUES (?1, ?2, ?3, ?4)
                 RETURNING {COLUMNS}"
            ),
            params![
                fields.name,
                fields.description.as_deref().unwrap_or(""),
                fields.price,
                fields.stock
            ],
            row_to_product,
        )
    }

    /// Overwrites the given fields (the others keep their values) and bumps the version.
    pub fn update(&self, id: i64, fields: &ProductFields) -> rusqlite::Result<Option<Product>> {
        let conn = self.conn.lock().expect("db mutex poisoned");
        conn.query_row(
            &format!(
                "UPDATE products SET
                     name = COALESCE(?2, name),
                     description = COALESCE(?3, description),
                     price = COALESCE(?4, price),
                     stock = COALESCE(?5, stock),
                     version = version + 1
                 WHERE id = ?1
                 RETURNING {COLUMNS}"
            ),
            params![
                id,
                fields.name,
                fields.description,
                fields.price,
                fields.stock
            ],
            row_to_product,
        )
        .optional()
    }

    pub fn delete(&self, id: i64) -> rusqlite::Result<bool> {
        let conn = self.conn.lock().expect("db mutex poisoned");
        Ok(conn.execute("DELETE FROM products WHERE id = ?1", params![id])? > 0)
    }
}
