"use strict";
window.addEventListener("hashchange", route);
route();
