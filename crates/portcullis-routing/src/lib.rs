//! Request routing for Portcullis: path normalisation (which must run before
//! routing and any auth decision) and the host/port/path/method route table.

pub mod normalize;
pub mod table;

pub use normalize::{normalize_path, EncodedSlash, NormalizeOptions, PathError, PathParameters};
pub use table::{
    split_host_port, HostPattern, Lookup, PathPattern, RouteError, RouteMatch, RouteSpec,
    RouteTable, RouteTableBuilder,
};
